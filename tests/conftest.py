"""Shared fixtures: a tiny VOC-layout root written by the test itself (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image


def annotation_xml(filename: str, width: int, height: int,
                   objects: Sequence[tuple[str, Sequence[float], int, int]]) -> str:
    """A VOC annotation; each object is `(name, (xmin, ymin, xmax, ymax) 1-based, difficult,
    truncated)`."""
    parts = [f"<annotation><folder>VOC</folder><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (x1, y1, x2, y2), difficult, truncated in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose>"
                     f"<truncated>{truncated}</truncated><difficult>{difficult}</difficult>"
                     f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
                     f"<ymax>{y2}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc_root(root: Path, images: dict[str, tuple[int, int, list]],
                   splits: dict[str, list[str]]) -> Path:
    """Write `images` = {id: (width, height, objects)} as a VOC root with the given splits."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, (width, height, objects) in images.items():
        pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            annotation_xml(f"{image_id}.jpg", width, height, objects))
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


TINY_IMAGES = {
    "img1": (64, 48, [("cat", (1, 1, 20, 20), 0, 0), ("dog", (30, 10, 60, 40), 1, 0)]),
    "img2": (64, 48, [("dog", (5, 5, 25, 45), 0, 1)]),
    "img3": (40, 40, [("bird", (10, 10, 30, 30), 0, 0), ("cat", (2, 2, 12, 12), 0, 0)]),
}


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """A 3-image VOC root with custom classes (bird, cat, dog), a difficult and a truncated object,
    and splits trainval = img1, img2 and test = img3."""
    return write_voc_root(tmp_path / "tiny", TINY_IMAGES,
                          {"trainval": ["img1", "img2"], "test": ["img3"],
                           "all": ["img1", "img2", "img3"]})


@pytest.fixture
def voc_writer():
    """The `write_voc_root` helper, for tests that build their own root."""
    return write_voc_root


# Small generated photos-to-be with drawn rectangles, so that selective search has real regions
# to find (and recall has something to measure).


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


def _random_scene(seed: int, height: int, width: int, count: int, max_start: float,
                  sides: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A random HxWx3 uint8 image and `count` random boxes `[count, 4]` (float, 0-based xyxy)
    starting below `max_start` with sides drawn from `sides`, clipped to the image."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    xy = rng.uniform(0, max_start, (count, 2))
    far = np.minimum(xy + rng.uniform(*sides, (count, 2)), [width - 1, height - 1])
    return image, np.concatenate([xy, far], 1)


@pytest.fixture(scope="session")
def random_scene():
    """`random_scene(seed, height, width, count, max_start, sides) -> (image, boxes)`."""
    return _random_scene
