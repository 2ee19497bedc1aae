"""The procedural demo dataset: VOC layout, valid annotations, determinism, variety."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from data.demo import DEMO_CLASSES, HEIGHT_RANGE, WIDTH_RANGE, generate_demo_dataset
from data.errors import FileError, SppnetError

SPLITS = ("trainval", "train", "val", "test")


def read_split(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def read_annotation(root: Path, image_id: str) -> dict:
    """Parse one VOC XML with xml.etree, independently of the project's reader."""
    ann = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot()
    assert ann.tag == "annotation"
    size = ann.find("size")
    objects = []
    for obj in ann.findall("object"):
        box = obj.find("bndbox")
        objects.append({
            "name": obj.findtext("name"),
            "pose": obj.findtext("pose"),
            "truncated": int(obj.findtext("truncated")),
            "difficult": int(obj.findtext("difficult")),
            "bbox": tuple(int(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")),
        })
    return {
        "folder": ann.findtext("folder"),
        "filename": ann.findtext("filename"),
        "width": int(size.findtext("width")),
        "height": int(size.findtext("height")),
        "depth": int(size.findtext("depth")),
        "segmented": int(ann.findtext("segmented")),
        "objects": objects,
    }


def all_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo_small")
    return root, generate_demo_dataset(root, seed=0, trainval=6, test=4)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """40 images: enough to see every class, difficult and truncated objects, small and large."""
    root = tmp_path_factory.mktemp("demo_sample")
    generate_demo_dataset(root, seed=7, trainval=30, test=10)
    return root


def test_classes_are_sorted_and_enough():
    assert len(DEMO_CLASSES) >= 5
    assert list(DEMO_CLASSES) == sorted(set(DEMO_CLASSES))


def test_layout_and_splits(small):
    root, _ = small
    splits = {s: read_split(root, s) for s in SPLITS}
    assert splits["trainval"] == [f"{i:06d}" for i in range(1, 7)]
    assert splits["test"] == [f"{i:06d}" for i in range(7, 11)]
    assert sorted(splits["train"] + splits["val"]) == splits["trainval"]
    assert not set(splits["train"]) & set(splits["val"])
    assert splits["val"] and splits["train"]
    assert not set(splits["trainval"]) & set(splits["test"])
    for image_id in splits["trainval"] + splits["test"]:
        assert (root / "Annotations" / f"{image_id}.xml").is_file()
        assert (root / "JPEGImages" / f"{image_id}.jpg").is_file()
    assert len(list((root / "JPEGImages").iterdir())) == 10
    assert not [p for p in root.rglob(".*") if p.is_file()], "temporary files left behind"


def test_summary(small):
    root, summary = small
    assert summary["root"] == str(root)
    assert summary["images"] == 10
    assert set(summary["classes"]) == set(DEMO_CLASSES)
    ids = read_split(root, "trainval") + read_split(root, "test")
    objects = [o for i in ids for o in read_annotation(root, i)["objects"]]
    assert summary["objects"] == len(objects) == sum(summary["classes"].values())
    for name in DEMO_CLASSES:
        assert summary["classes"][name] == sum(o["name"] == name for o in objects)
    assert summary["seconds"] >= 0


def test_annotations_are_valid_voc(small):
    root, _ = small
    for image_id in read_split(root, "trainval") + read_split(root, "test"):
        ann = read_annotation(root, image_id)
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (ann["width"], ann["height"])
        assert WIDTH_RANGE[0] <= ann["width"] <= WIDTH_RANGE[1]
        assert HEIGHT_RANGE[0] <= ann["height"] <= HEIGHT_RANGE[1]
        assert ann["filename"] == f"{image_id}.jpg"
        assert ann["depth"] == 3 and ann["segmented"] == 0
        assert 1 <= len(ann["objects"]) <= 5
        for obj in ann["objects"]:
            assert obj["name"] in DEMO_CLASSES
            assert obj["pose"] == "Unspecified"
            assert obj["truncated"] in (0, 1) and obj["difficult"] in (0, 1)
            xmin, ymin, xmax, ymax = obj["bbox"]
            assert 1 <= xmin <= xmax <= ann["width"]
            assert 1 <= ymin <= ymax <= ann["height"]


def test_same_seed_gives_identical_bytes(small, tmp_path):
    root, _ = small
    generate_demo_dataset(tmp_path, seed=0, trainval=6, test=4)
    assert all_files(tmp_path) == all_files(root)


def test_other_seed_gives_other_images(small, tmp_path):
    root, _ = small
    generate_demo_dataset(tmp_path, seed=1, trainval=6, test=4)
    for image_id in read_split(root, "trainval") + read_split(root, "test"):
        name = f"JPEGImages/{image_id}.jpg"
        assert (tmp_path / name).read_bytes() != (root / name).read_bytes()


def test_sample_has_variety(sample):
    ids = read_split(sample, "trainval") + read_split(sample, "test")
    assert len(ids) == 40
    names, difficult, truncated, small_objects, large_objects = set(), 0, 0, 0, 0
    for image_id in ids:
        ann = read_annotation(sample, image_id)
        side = min(ann["width"], ann["height"])
        for obj in ann["objects"]:
            xmin, ymin, xmax, ymax = obj["bbox"]
            longest = max(xmax - xmin + 1, ymax - ymin + 1)
            names.add(obj["name"])
            difficult += obj["difficult"]
            truncated += obj["truncated"]
            small_objects += longest < 30
            large_objects += longest > side / 2
    assert names == set(DEMO_CLASSES)
    assert difficult >= 1 and truncated >= 1
    assert small_objects >= 1 and large_objects >= 1


def test_truncated_objects_mostly_touch_the_border(sample):
    """Boxes come from the drawn mask: a border-cut object's box reaches the image edge, unless a
    later object hides the part next to the border (allowed, hence 'mostly')."""
    touching = total = 0
    for image_id in read_split(sample, "trainval") + read_split(sample, "test"):
        ann = read_annotation(sample, image_id)
        for obj in ann["objects"]:
            if obj["truncated"]:
                xmin, ymin, xmax, ymax = obj["bbox"]
                total += 1
                w, h = ann["width"], ann["height"]
                touching += xmin <= 2 or ymin <= 2 or xmax >= w - 1 or ymax >= h - 1
    assert total >= 1 and touching >= 0.8 * total


def test_rerun_overwrites_and_drops_stale_files(tmp_path):
    generate_demo_dataset(tmp_path, seed=0, trainval=5, test=3)
    generate_demo_dataset(tmp_path, seed=2, trainval=3, test=1)
    assert read_split(tmp_path, "trainval") == ["000001", "000002", "000003"]
    assert read_split(tmp_path, "test") == ["000004"]
    assert sorted(p.name for p in (tmp_path / "JPEGImages").iterdir()) == [
        f"{i:06d}.jpg" for i in range(1, 5)
    ]
    assert len(list((tmp_path / "Annotations").iterdir())) == 4
    fresh = tmp_path / "fresh"
    generate_demo_dataset(fresh, seed=2, trainval=3, test=1)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        for p in (fresh / sub).iterdir():
            assert (tmp_path / sub / p.name).read_bytes() == p.read_bytes()


def test_refuses_a_directory_with_another_voc_dataset(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "000001.xml").write_text("<annotation/>")
    with pytest.raises(FileError, match="not a sppnet demo dataset"):
        generate_demo_dataset(tmp_path, trainval=2, test=1)
    assert (tmp_path / "Annotations" / "000001.xml").read_text() == "<annotation/>"


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"trainval": -1}, {"test": -1},
                                    {"trainval": 0, "test": 0}])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(SppnetError):
        generate_demo_dataset(tmp_path / "out", **{"trainval": 2, "test": 1, **kwargs})
