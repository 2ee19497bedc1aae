"""PR-curve PNG, report.md and annotated example images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detection.report import class_colour, draw_detections, plot_pr_curves, write_report

SUMMARY = {"method": "spp", "dataset": "demo", "split": "test", "metric": "voc07",
           "mAP": 0.5125, "ap": {"cat": 0.75, "dog": 0.275, "bird": None},
           "scales": [688], "scorer": "svm", "test_mirror": True,
           "box_voting": True, "images": 3,
           "coco": {"AP": 0.301, "AP50": 0.6, "AP75": None}, "seconds_per_image": 0.1234}


def _curves():
    recall = np.array([0.25, 0.5, 0.5, 0.75])
    return {"cat": (recall, np.array([1.0, 1.0, 0.67, 0.75])),
            "dog": (np.array([0.5]), np.array([0.5])), "bird": (np.zeros(0), np.zeros(0))}


def test_pr_curves_png(tmp_path):
    path = plot_pr_curves(_curves(), SUMMARY["ap"], tmp_path / "pr" / "pr_curves.png",
                          "spp on demo/test")
    assert path == tmp_path / "pr" / "pr_curves.png"
    with Image.open(path) as png:
        png.load()
        assert png.format == "PNG" and png.width > 300 and png.height > 200
    assert sorted(p.name for p in path.parent.iterdir()) == ["pr_curves.png"]   # no temp left


def test_pr_curves_without_classes(tmp_path):
    path = plot_pr_curves({}, {}, tmp_path / "empty.png", "nothing")
    with Image.open(path) as png:
        png.load()
        assert png.format == "PNG"


def test_report_contents(tmp_path):
    path = write_report(tmp_path, SUMMARY, "pr_curves.png",
                        ["example_1.jpg", str(tmp_path / "ex" / "my image.png")])
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert text.startswith("# spp on demo/test\n")
    assert "| cat | 75.0 |" in text and "| dog | 27.5 |" in text and "| bird | - |" in text
    assert "| **mAP** | **51.2** |" in text
    assert "| 30.1 | 60.0 | - |" in text                       # COCO AP, AP50, AP75
    assert "0.123 s per image" in text and "688" in text and "voc07" in text
    assert "each image also run flipped, the two passes averaged" in text
    assert "box voting: each kept box moved" in text
    one_pass = write_report(tmp_path / "one", {**SUMMARY, "test_mirror": False,
                                               "box_voting": False}, None, [])
    assert "one pass per image" in one_pass.read_text()
    assert "no box voting" in one_pass.read_text()
    assert "](pr_curves.png)" in text and "](example_1.jpg)" in text
    assert "](<ex/my image.png>)" in text                       # absolute made relative
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "report.md"]


def test_report_minimal_summary(tmp_path):
    text = write_report(tmp_path, {"method": "rcnn", "dataset": "voc", "mAP": None, "ap": {}},
                        None, []).read_text()
    assert "# rcnn on voc" in text and "| **mAP** | **-** |" in text
    assert "![" not in text and "COCO" not in text and "per image" not in text
    assert "flipped" not in text


def _image(h=48, w=64):
    return np.random.default_rng(0).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["det.png", "det.jpg"])
def test_draw_detections(tmp_path, name):
    image = _image()
    before = image.copy()
    boxes = np.array([[5.0, 20.0, 40.0, 45.0], [30.0, 2.0, 62.0, 30.0]])
    path = draw_detections(image, boxes, np.array([1, 2]), np.array([0.9, -0.3]),
                           ["cat", "dog"], tmp_path / name)
    assert np.array_equal(image, before)                 # input untouched
    assert [p.name for p in tmp_path.iterdir()] == [name]
    with Image.open(path) as im:
        assert im.format == ("PNG" if name.endswith("png") else "JPEG")
        out = np.asarray(im.convert("RGB"))
    assert out.shape == image.shape
    diff = np.abs(out.astype(int) - image.astype(int)).sum(axis=2)
    assert diff[44:46, 10:35].mean() > 60                    # the bottom edge of box 1
    if name.endswith("png"):                                  # lossless: exact colours, and
        assert (out[45, 10:35] == class_colour(1)).all()     # pixels far from boxes unchanged
        assert np.array_equal(out[2:10, 0:4], image[2:10, 0:4])


def test_draw_detections_torch_inputs_and_clipping(tmp_path):
    image = _image(20, 30)
    path = draw_detections(image, torch.tensor([[-5.0, -5.0, 100.0, 100.0]]),
                           torch.tensor([7]), torch.tensor([1.5]), ["a"], tmp_path / "x.png")
    out = np.asarray(Image.open(path).convert("RGB"))
    assert out.shape == (20, 30, 3)
    assert (out[19, :] == class_colour(7)).all()             # clipped to the image border


def test_draw_no_detections_and_bad_extension(tmp_path):
    image = _image()
    path = draw_detections(image, np.zeros((0, 4)), np.zeros(0), np.zeros(0), [],
                           tmp_path / "e.png")
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)
    with pytest.raises(ValueError, match="extension"):
        draw_detections(image, np.zeros((0, 4)), [], [], [], tmp_path / "e.gif")
    assert [p.name for p in tmp_path.iterdir()] == ["e.png"]
