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
