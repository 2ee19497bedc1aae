"""Fixtures for the proposal tests: small generated photos-to-be with drawn rectangles, so that
selective search has real regions to find (and recall has something to measure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def drawn_image(seed: int, width: int = 200, height: int = 150) -> tuple[np.ndarray, list]:
    """An RGB uint8 image: a smooth gradient with 3 filled rectangles of distinct colours.
    Returns the image and the rectangles as 1-based VOC boxes (xmin, ymin, xmax, ymax)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(60, 200, size=3)
    image = np.clip(base[None, None, :] + 0.2 * xx[..., None] - 0.15 * yy[..., None],
                    0, 255).astype(np.uint8)
    boxes = []
    for _ in range(3):
        w, h = rng.integers(width // 6, width // 2), rng.integers(height // 6, height // 2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        image[y:y + h, x:x + w] = rng.integers(0, 256, size=3)
        boxes.append((int(x) + 1, int(y) + 1, int(x + w), int(y + h)))
    return image, boxes


def write_drawn_images(folder: Path, count: int = 3, start: int = 0) -> list[Path]:
    """`count` drawn images as JPEG files `img<i>.jpg` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        image, _ = drawn_image(i)
        path = folder / f"img{i}.jpg"
        Image.fromarray(image).save(path, quality=95)
        paths.append(path)
    return paths


@pytest.fixture
def drawn_paths(tmp_path: Path) -> list[Path]:
    """Three drawn 200x150 JPEG files."""
    return write_drawn_images(tmp_path / "images", 3)


@pytest.fixture
def drawn_voc(tmp_path: Path, voc_writer) -> Path:
    """A VOC root of three drawn 200x150 images (split `test`), the rectangles annotated as
    class `box` (the last one of img2 marked difficult)."""
    images = {}
    drawn = {}
    for i in range(3):
        image, boxes = drawn_image(i)
        objects = [("box", b, int(i == 2 and k == 2), 0) for k, b in enumerate(boxes)]
        images[f"img{i}"] = (200, 150, objects)
        drawn[f"img{i}"] = image
    root = voc_writer(tmp_path / "drawn", images, {"test": list(images)})
    for image_id, image in drawn.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    return root


@pytest.fixture
def draw():
    """The `drawn_image(seed, width=200, height=150)` helper."""
    return drawn_image


@pytest.fixture
def write_drawn():
    """The `write_drawn_images(folder, count=3, start=0)` helper."""
    return write_drawn_images
