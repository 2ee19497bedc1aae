"""`sppnet proposals` end to end on a tiny drawn VOC root: figures, JSON, plot, cache, errors."""

from __future__ import annotations

import json

import pytest

from detection.cli import main

KEYS = {"images", "boxes_per_image", "seconds_per_image", "recall@0.5", "recall@0.7",
        "average_recall"}
FIGURES = sorted(KEYS)


def _run(root, work, *extra):
    return main(["proposals", "--voc-root", str(root), "--split", "test", "--workdir", str(work),
                 "--no-progress", *extra])


def test_end_to_end_then_served_from_cache(drawn_voc, tmp_path, capsys):
    work, first_json, second_json = tmp_path / "work", tmp_path / "p1.json", tmp_path / "p2.json"
    plot = tmp_path / "plots" / "recall.png"
    assert _run(drawn_voc, work, "--jobs", "1", "--json", str(first_json),
                "--plot", str(plot)) == 0
    out = capsys.readouterr().out
    for label in ("3 images", "boxes per image", "seconds per image", "recall@0.5",
                  "recall@0.7", "average recall"):
        assert label in out
    first = json.loads(first_json.read_text())
    assert KEYS <= set(first)
    assert first["images"] == 3 and first["objects"] == 8          # one of 9 is difficult
    assert first["boxes_per_image"] > 5 and first["seconds_per_image"] > 0
    assert first["recall@0.5"] >= 0.85 and 0 <= first["average_recall"] <= first["recall@0.5"]
    assert (first["computed"], first["cached"], first["errors"]) == (3, 0, [])
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((work / "proposals").glob("drawn-*/*.npz"))) == 3

    assert _run(drawn_voc, work, "--json", str(second_json)) == 0
    out = capsys.readouterr().out
    assert "from cache" in out and "wall time" in out
    second = json.loads(second_json.read_text())
    assert (second["computed"], second["cached"]) == (0, 3)
    assert [second[k] for k in FIGURES] == [first[k] for k in FIGURES]
    assert second["wall_seconds"] < first["wall_seconds"]


def test_other_settings_are_computed_again(drawn_voc, tmp_path, capsys):
    work, out_json = tmp_path / "work", tmp_path / "p.json"
    assert _run(drawn_voc, work, "--jobs", "1") == 0
    assert _run(drawn_voc, work, "--jobs", "1", "--min-size", "5",
                "--json", str(out_json)) == 0
    summary = json.loads(out_json.read_text())
    assert summary["computed"] == 3
    assert len(list((work / "proposals").iterdir())) == 2


def test_a_shorter_list_is_cut_from_a_longer_one(drawn_voc, tmp_path, capsys):
    work, long_json, short_json = tmp_path / "work", tmp_path / "l.json", tmp_path / "s.json"
    assert _run(drawn_voc, work, "--jobs", "1", "--json", str(long_json)) == 0
    assert _run(drawn_voc, work, "--jobs", "1", "--max-proposals", "5",
                "--json", str(short_json)) == 0
    summary = json.loads(short_json.read_text())
    assert summary["computed"] == 0 and summary["cached"] == 3
    assert json.loads(long_json.read_text())["boxes_per_image"] > 5 >= summary["boxes_per_image"]
    assert len(list((work / "proposals").iterdir())) == 2   # and stored under its own settings


def test_bad_image_is_reported_and_the_rest_finish(drawn_voc, tmp_path, capsys):
    (drawn_voc / "JPEGImages" / "img1.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out_json = tmp_path / "p.json"
    assert _run(drawn_voc, tmp_path / "work", "--jobs", "1", "--json", str(out_json)) == 0
    err = capsys.readouterr().err
    assert "img1.jpg: " in err
    summary = json.loads(out_json.read_text())
    assert summary["images"] == 2 and len(summary["errors"]) == 1


@pytest.mark.parametrize("problem", ["no_root", "no_split", "all_bad"])
def test_errors_are_one_line_exit_2(drawn_voc, tmp_path, capsys, problem):
    root, split = drawn_voc, "test"
    if problem == "no_root":
        root = tmp_path / "nowhere"
    elif problem == "no_split":
        split = "val"
    else:
        for jpg in (drawn_voc / "JPEGImages").glob("*.jpg"):
            jpg.write_bytes(b"nope")
    status = main(["proposals", "--voc-root", str(root), "--split", split, "--workdir",
                   str(tmp_path / "w"), "--jobs", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("sppnet proposals: error: ")


def test_jobs_and_scheduler_exclude_each_other(drawn_voc, tmp_path):
    with pytest.raises(SystemExit) as info:
        _run(drawn_voc, tmp_path, "--jobs", "2", "--scheduler", "tcp://127.0.0.1:8786")
    assert info.value.code == 2


def test_registering_the_command_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, detection.cli; detection.cli.build_parser(); "
            "heavy = [m for m in ('cv2', 'torch', 'torchvision', 'dask', 'distributed', "
            "'matplotlib') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
