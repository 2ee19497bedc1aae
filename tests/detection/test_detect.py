"""`sppnet detect` on a folder of real-world oddities: every good image gets an entry, every bad
file a reason, exit status 0, no traceback, the input folder untouched, nothing written outside
OUT, a rerun reuses what is done; and the pieces (safe names, containment, scanning) alone."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from data.demo import generate_demo_dataset
from detection.cli import main
from detection.detect import (OutputNames, is_safe_output_name, is_within, safe_component,
                              scan_folder)

GOOD = ["UPPER.JPG", "bitmap.bmp", "café été ☀.jpg", "cmyk.jpg", "deep16.png", "folder.jpeg",
        "folder.jpg/inner.png", "gray.png", "link.jpg", "noext", "palette.png", "photo.webp",
        "rgba.png", "rotated.jpg", "sub/deeper/nested image.png", "tiny.png", "x.png",
        "x.png.jpg"]
BAD = {"bomb.png": "decompression bomb", "empty.jpg": "empty", "folder.jpg": "is a directory",
       "outside.jpg": "outside", "text.jpg": "not a recognised image format",
       "truncated.jpg": "truncated"}


# --------------------------------------------------------------------------------------------
# Fixtures


def _picture(seed: int, width: int = 96, height: int = 72) -> np.ndarray:
    """A gradient with three filled rectangles: regions for selective search to find."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.clip(rng.integers(60, 200, 3)[None, None] + 0.5 * xx[..., None]
                    - 0.3 * yy[..., None], 0, 255).astype(np.uint8)
    for _ in range(3):
        w, h = rng.integers(width // 5, width // 2), rng.integers(height // 5, height // 2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return image


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def make_odd_folder(root: Path, outside: Path) -> Path:
    """The issue's folder: good images of many kinds (see GOOD) next to bad files (see BAD)
    and a README.txt that must be ignored."""
    root.mkdir(parents=True)

    def save(seed: int, name: str, **options) -> None:
        Image.fromarray(_picture(seed)).save(root / name, **options)

    Image.fromarray(_picture(1)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "palette.png")
    Image.fromarray(_picture(2)).convert("RGBA").save(root / "rgba.png")
    Image.fromarray(_picture(3)).convert("L").save(root / "gray.png")
    Image.fromarray(_picture(4)[..., 0].astype(np.uint16) * 257).save(root / "deep16.png")
    Image.fromarray(_picture(5)).convert("CMYK").save(root / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 120x80, seen 80x120
    Image.fromarray(_picture(6, 120, 80)).save(root / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(_picture(7, 8, 8)).save(root / "tiny.png")
    save(8, "photo.webp")
    save(9, "bitmap.bmp")
    save(10, "UPPER.JPG")
    save(11, "café été ☀.jpg")
    (root / "sub" / "deeper").mkdir(parents=True)
    save(12, "sub/deeper/nested image.png")
    save(13, "noext", format="JPEG")                    # recognised by content only
    save(14, "x.png")                                  # annotated x.png.jpg ...
    save(15, "x.png.jpg")                              # ... which this one wants too
    (root / "folder.jpg").mkdir()                      # a directory named like an image
    save(16, "folder.jpg/inner.png")
    save(17, "folder.jpeg")                            # annotated folder.jpg: a file vs a folder
    (root / "link.jpg").symlink_to("bitmap.bmp")       # inside DIR: followed
    outside.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_picture(18)).save(outside)
    (root / "outside.jpg").symlink_to(outside)         # leaves DIR: reported, not followed
    (root / "README.txt").write_text("not an image\n")
    (root / "empty.jpg").write_bytes(b"")
    data = (root / "UPPER.JPG").read_bytes()
    (root / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "text.jpg").write_text("hello, I am text\n")
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
        + _png_chunk(b"IEND", b""))
    return root


def tree_state(root: Path, exclude: Path | None = None) -> dict[str, tuple]:
    """Every entry under `root` (not following links) with its kind, size, mtime and content
    hash (files) or target (links); `exclude` and what is under it left out."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            if exclude is not None and (path == exclude or exclude in path.parents):
                continue
            st = path.lstat()
            if path.is_symlink():
                state[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                state[str(path)] = ("dir", st.st_mtime_ns, st.st_mode)
            else:
                state[str(path)] = ("file", st.st_size, st.st_mtime_ns, st.st_mode,
                                    hashlib.sha256(path.read_bytes()).hexdigest())
    return state


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(workdir, model file) of an SPP-net trained for a few steps on 3 demo images."""
    base = tmp_path_factory.mktemp("detect_model")
    generate_demo_dataset(base / "voc", seed=0, trainval=3, test=0)
    work = base / "work"
    assert main(["train", "--voc-root", str(base / "voc"), "--split", "trainval", "--method",
                 "spp", "--workdir", str(work), "--jobs", "1", "--quiet", "--device", "cpu",
                 "--pretrain-epochs", "1", "--finetune-iters", "3"]) == 0
    return work, work / "models" / "voc-small" / "spp.pt"


# --------------------------------------------------------------------------------------------
# End to end


def test_detect_on_a_folder_of_oddities(trained, tmp_path, capsys):
    work, model = trained
    photos = make_odd_folder(tmp_path / "photos", tmp_path / "elsewhere" / "img.jpg")
    out, summary_path = tmp_path / "out", tmp_path / "out" / "summary.json"
    before_dir, before_tmp = tree_state(photos), tree_state(tmp_path)
    before_work = tree_state(work)
    # the smoke-trained model is not confident: keep every scored box
    args = ["detect", str(photos), "--workdir", str(work), "--out", str(out), "--jobs", "1",
            "--device", "cpu", "--json", str(summary_path), "--score-threshold", "0"]

    assert main(args) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    summary = json.loads(summary_path.read_text())
    assert [entry["file"] for entry in summary["images"]] == GOOD
    reasons = {e["file"]: e["reason"] for e in summary["errors"]}
    assert set(reasons) == set(BAD)
    for name, words in BAD.items():
        assert words in reasons[name] and f"skipped {name}: " in err
    assert "README.txt" not in err
    assert summary["computed"] == len(GOOD) and summary["reused"] == 0

    # the input folder is unchanged and nothing was written outside OUT
    assert tree_state(photos) == before_dir
    assert tree_state(tmp_path, exclude=out) == before_tmp
    assert tree_state(work) == before_work

    # detections.json: COCO images, categories, scored annotations
    doc = json.loads((out / "detections.json").read_text())
    assert [im["file_name"] for im in doc["images"]] == GOOD
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in doc["images"]}
    assert sizes["rotated.jpg"] == (80, 120) and sizes["tiny.png"] == (8, 8)
    assert [c["name"] for c in doc["categories"]] == list(_classes(model))
    counts = {e["file"]: e["detections"] for e in summary["images"]}
    per_image = {im["id"]: 0 for im in doc["images"]}
    for ann in doc["annotations"]:
        per_image[ann["image_id"]] += 1
        x, y, w, h = ann["bbox"]
        assert w >= 1 and h >= 1 and 1 <= ann["category_id"] <= len(doc["categories"])
    assert {im["file_name"]: per_image[im["id"]] for im in doc["images"]} == counts
    assert sum(counts.values()) > 0 and counts["tiny.png"] == 0   # no proposal fits 8x8
    coco = COCO()                       # loads as a COCO dataset, and as COCO results
    coco.dataset = doc
    coco.createIndex()
    assert len(coco.loadRes(doc["annotations"]).getAnnIds()) == len(doc["annotations"])

    # the CSV holds the same detections, corners in 0-based pixels
    rows = (out / "detections.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "file,class,score,x1,y1,x2,y2" and len(rows) == 1 + len(doc["annotations"])

    # annotated copies: one per image, safe unique names, all inside OUT/annotated
    names = [im["annotated"] for im in doc["images"]]
    assert len({n.casefold() for n in names}) == len(names)
    annotated_root = (out / "annotated").resolve()
    for name in names:
        path = (out / name).resolve()
        assert annotated_root in path.parents and path.is_file()
        assert is_safe_output_name(name[len("annotated/"):])
        Image.open(path).verify()
    by_file = dict(zip(GOOD, names))
    assert by_file["café été ☀.jpg"] == "annotated/café été ☀.jpg"          # unicode kept
    assert by_file["x.png"] == "annotated/x.png.jpg"
    assert by_file["x.png.jpg"] == "annotated/x.png-2.jpg"                  # collision
    assert by_file["folder.jpeg"] == "annotated/folder.jpg"
    assert by_file["folder.jpg/inner.png"] == "annotated/folder.jpg-2/inner.png.jpg"

    # a second run reuses every image and writes the same files
    first_json = (out / "detections.json").read_bytes()
    first_csv = (out / "detections.csv").read_bytes()
    assert main([*args, "--quiet"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    again = json.loads(summary_path.read_text())
    assert again["reused"] == len(GOOD) and again["computed"] == 0
    assert (out / "detections.json").read_bytes() == first_json
    assert (out / "detections.csv").read_bytes() == first_csv
    assert tree_state(photos) == before_dir

    # a changed image, and a lost record, are redone; the rest is reused
    Image.fromarray(_picture(99)).save(photos / "gray.png")
    record = next(p for p in (out / ".sppnet" / "records").iterdir()
                  if json.loads(p.read_text())["file"] == "bitmap.bmp")
    record.unlink()
    assert main([*args, "--quiet"]) == 0
    third = json.loads(summary_path.read_text())
    assert third["computed"] == 2 and third["reused"] == len(GOOD) - 2

    # one pass instead of the mirror pass is another result: every image is redone
    assert main([*args, "--quiet", "--no-test-mirror"]) == 0
    fourth = json.loads(summary_path.read_text())
    assert fourth["computed"] == len(GOOD) and fourth["reused"] == 0
    assert json.loads((out / "detections.json").read_text())["info"]["test_mirror"] is False
    # and so is keeping the boxes where NMS left them
    assert main([*args, "--quiet", "--no-test-mirror", "--no-box-voting"]) == 0
    fifth = json.loads(summary_path.read_text())
    assert fifth["computed"] == len(GOOD) and fifth["reused"] == 0
    info = json.loads((out / "detections.json").read_text())["info"]
    assert info["box_voting"] is False and info["test_mirror"] is False


def _classes(model: Path) -> tuple[str, ...]:
    from detection.model import load_detector

    return load_detector(model).classes


def test_detect_with_model_file_threshold_and_odd_names(trained, tmp_path, capsys):
    _, model = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_picture(1)).save(photos / "a.jpg")
    Image.fromarray(_picture(2)).save(os.path.join(os.fsencode(photos), b"bad\xff.jpg"),
                                      format="JPEG")           # not valid UTF-8
    Image.fromarray(_picture(3)).save(photos / "new\nline.jpg")
    (photos / "tab\tfile.jpg").write_text("text")
    out = tmp_path / "out"
    assert main(["detect", str(photos), "--model", str(model), "--out", str(out), "--quiet",
                 "--jobs", "1", "--device", "cpu", "--score-threshold", "1e9"]) == 0
    doc = json.loads((out / "detections.json").read_text())
    assert [im["file_name"] for im in doc["images"]] == ["a.jpg", "bad\udcff.jpg",
                                                         "new\nline.jpg"]
    assert [im["annotated"] for im in doc["images"]] == ["annotated/a.jpg", "annotated/bad_.jpg",
                                                         "annotated/new_line.jpg"]
    assert doc["annotations"] == [] and doc["info"]["score_threshold"] == 1e9
    captured = capsys.readouterr()
    assert "3 images" in captured.out
    assert "skipped tab\\tfile.jpg: not a recognised image format" in captured.err.splitlines()


@pytest.mark.parametrize("case", ["no_model", "out_inside", "out_is_dir", "json_inside",
                                  "missing_dir", "nothing_readable", "no_images",
                                  "wrong_method"])
def test_detect_errors_are_one_line(trained, tmp_path, capsys, case):
    work, model = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "notes.txt").write_text("text")
    if case != "no_images":
        (photos / "broken.jpg").write_text("not a jpeg")
    args = ["detect", str(photos), "--workdir", str(work), "--out", str(tmp_path / "out"),
            "--quiet", "--jobs", "1", "--device", "cpu"]
    expected = {"no_model": "sppnet demo", "out_inside": "inside",
                "out_is_dir": "inside", "json_inside": "--json",
                "missing_dir": "no such folder", "nothing_readable": "could be read",
                "no_images": "no image file found", "wrong_method": "not rcnn"}[case]
    if case == "no_model":
        args[3] = str(tmp_path / "empty-work")
    elif case == "out_inside":
        args[5] = str(photos / "out")
    elif case == "out_is_dir":
        args[5] = str(photos)
    elif case == "json_inside":
        args += ["--json", str(photos / "summary.json")]
    elif case == "missing_dir":
        args[1] = str(tmp_path / "nope")
    elif case == "wrong_method":
        args[2:4] = ["--model", str(model), "--method", "rcnn"]
    before = tree_state(photos)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and expected in err[-1] and err[-1].startswith("sppnet detect: error:")
    assert "Traceback" not in "\n".join(err)
    assert tree_state(photos) == before


# --------------------------------------------------------------------------------------------
# The pieces


def test_scan_recognises_by_content_and_reports_lookalikes(tmp_path):
    photos = make_odd_folder(tmp_path / "photos", tmp_path / "elsewhere" / "img.jpg")
    os.symlink("missing.png", photos / "dangling.png")
    os.mkfifo(photos / "pipe.jpg")
    scan = scan_folder(photos)
    # the bomb and the truncated JPEG are recognised by their headers; loading them fails later
    assert [image.rel for image in scan.images] == sorted([*GOOD, "bomb.png", "truncated.jpg"])
    reasons = {s.rel: s.reason for s in scan.skipped}
    assert set(reasons) == {*BAD, "dangling.png", "pipe.jpg"} - {"bomb.png", "truncated.jpg"}
    assert reasons["dangling.png"] == "broken symbolic link"
    assert reasons["pipe.jpg"] == "not a regular file"


@pytest.mark.parametrize("name, expected", [
    ("café", "café"), ("cafe\u0301", "café"), ("..", "_"), (".", "_"), ("", "_"),
    ("a/b", "a_b"), ("a\\b", "a_b"), ("a\x00b", "a_b"), ("a:b*?", "a_b__"), ("name. ", "name"),
    ("CON", "_CON"), ("nul.txt", "_nul.txt"), ("bad\udcffbyte", "bad_byte"),
    ("x" * 300, "x" * 200), ("é" * 150, "é" * 100),
])
def test_safe_component(name, expected):
    assert safe_component(name) == expected
    assert safe_component(expected) == expected          # idempotent


def test_output_names_are_unique_safe_and_stable():
    names = OutputNames()
    assert names.reserve("kept.jpg")
    assert not names.reserve("KEPT.jpg") and not names.reserve("../up.jpg")
    assigned = [names.assign(rel) for rel in
                ["A.jpg", "a.jpg", "a.JPEG", "kept.jpg", "b.png", "b.png.jpg", "../x.jpg",
                 "sub/c.jpg", "SUB/d.jpg", "e.jpg/f.png", "\x00.jpg", "CON.png"]]
    assert assigned == ["A.jpg", "a-2.jpg", "a-3.jpg", "kept-2.jpg", "b.png.jpg",
                        "b.png-2.jpg", "_/x.jpg", "sub/c.jpg", "SUB/d.jpg", "e.jpg/f.png.jpg",
                        "_.jpg", "_CON.png.jpg"]
    assert all(is_safe_output_name(name) for name in assigned)
    files = OutputNames()
    assert files.assign("e.jpeg") == "e.jpg"               # a file named e.jpg ...
    assert files.assign("e.jpg/f.png") == "e.jpg-2/f.png.jpg"  # ... so the folder moves


def test_is_within_sees_through_links(tmp_path):
    inner = tmp_path / "dir" / "inner"
    inner.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    assert is_within(tmp_path / "dir", tmp_path / "dir")
    assert is_within(inner / "not-yet" / "deeper", tmp_path / "dir")
    assert is_within(tmp_path / "link" / "new", tmp_path / "dir")
    assert not is_within(tmp_path / "other", tmp_path / "dir")
    assert not is_within(tmp_path / "dir", tmp_path / "missing")
