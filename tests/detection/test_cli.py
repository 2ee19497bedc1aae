"""The command line: help for every subcommand, `score` end to end, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.results import ClassDetections, write_voc_results
from detection.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - introspection
    assert {"make-demo-data", "score"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: sppnet " + name in capsys.readouterr().out


def test_score_prints_table_and_writes_json(tiny_voc, tmp_path, capsys):
    dets = {"bird": ClassDetections(["img3"], [0.9], [[9, 9, 29, 29]]),
            "cat": ClassDetections(["img3", "img3"], [0.8, 0.7], [[1, 1, 11, 11], [1, 1, 11, 11]])}
    write_voc_results(tmp_path / "dets", "test", dets)
    out_json = tmp_path / "score.json"
    status = main(["score", "--voc-root", str(tiny_voc), "--split", "test", "--dets",
                   str(tmp_path / "dets"), "--json", str(out_json)])
    captured = capsys.readouterr()
    assert status == 0
    assert "mAP" in captured.out and "100.0" in captured.out
    assert "dog" in captured.err        # its result file is missing: said on stderr
    summary = json.loads(out_json.read_text())
    assert summary["metric"] == "voc07"
    assert summary["ap"] == {"bird": pytest.approx(1.0), "cat": pytest.approx(1.0), "dog": None}
    assert summary["mAP"] == pytest.approx(1.0)
    assert summary["coco"]["AP"] == pytest.approx(1.0)


def test_score_says_which_classes_the_split_lacks_and_which_it_has_beyond(tiny_voc, tmp_path,
                                                                         capsys):
    """Scoring a split: a class it has no object of is a warning (AP '-'), annotated classes
    outside `--classes` a note (their objects count as background); one line each."""
    dets = {"cat": ClassDetections(["img3"], [0.8], [[1, 1, 11, 11]])}
    write_voc_results(tmp_path / "dets", "test", dets)
    status = main(["score", "--voc-root", str(tiny_voc), "--split", "test", "--dets",
                   str(tmp_path / "dets"), "--classes", "Bird,cat"])
    assert status == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "ImageSets" in line]
    assert len(err) == 2
    assert err[0].startswith("warning: ") and "'Bird' (did you mean 'bird'?)" in err[0]
    assert err[0].endswith("such a class scores '-' and stays out of the mAP")
    assert err[1].startswith("note: ") and err[1].endswith(
        "objects of 1 class not among --classes count as background: bird")
    # an object annotated wholly outside its image: a warning naming its file
    xml = tiny_voc / "Annotations" / "img3.xml"
    xml.write_text(xml.read_text().replace("</annotation>", (
        "<object><name>cat</name><bndbox><xmin>50</xmin><ymin>2</ymin><xmax>60</xmax>"
        "<ymax>12</ymax></bndbox></object></annotation>")))
    assert main(["score", "--voc-root", str(tiny_voc), "--split", "test", "--dets",
                 str(tmp_path / "dets"), "--classes", "cat"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "wholly outside" in line] == [
        f"warning: {tiny_voc / 'Annotations' / 'img3.xml'}: the box of an object (cat) lies "
        "wholly outside its 40x40 image, so no detection can match it and it counts as missed"]


@pytest.mark.parametrize("breakage", ["bad_xml", "no_dets", "bad_line"])
def test_score_errors_are_one_line(tiny_voc, tmp_path, capsys, breakage):
    det_dir = tmp_path / "dets"
    write_voc_results(det_dir, "test", {"cat": ClassDetections(["img3"], [1], [[0, 0, 5, 5]])})
    if breakage == "bad_xml":
        (tiny_voc / "Annotations" / "img3.xml").write_text("<annotation><object>")
        expected = "img3.xml"
    elif breakage == "no_dets":
        det_dir = tmp_path / "empty"
        det_dir.mkdir()
        expected = "no result files"
    else:
        (det_dir / "comp4_det_test_cat.txt").write_text("img3 1 2 3\n")
        expected = "comp4_det_test_cat.txt: line 1"
    status = main(["score", "--voc-root", str(tiny_voc), "--split", "test", "--dets", str(det_dir),
                   "--classes", "bird,cat,dog"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bench_prints_the_table_and_writes_json(drawn_voc, tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = main(["bench", "--voc-root", str(drawn_voc), "--split", "test", "--images", "2",
                   "--preset", "small", "--rcnn-sample", "3", "--no-multiscale", "--jobs", "1",
                   "--workdir", str(tmp_path / "w"), "--json", str(out), "--device", "cpu"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "SPP-net 1-scale" in printed and "R-CNN" in printed and "scaled up" in printed
    summary = json.loads(out.read_text())
    for method in ("spp", "rcnn"):
        row = summary[method]
        assert row["total_s"] == pytest.approx(row["conv_s"] + row["pool_s"] + row["fc_s"])
        assert row["conv_gflops_per_s"] > 0 and row["fc_gflops_per_s"] > 0
    assert summary["rcnn"]["extrapolated_from"] == 3
    assert summary["speedup"] == pytest.approx(summary["rcnn"]["total_s"] / summary["spp"]["total_s"])
    assert summary["matmul_gflops_per_s"] > 0 and summary["device"].startswith("CPU")


def test_bench_variants_rows_and_bad_names(drawn_voc, tmp_path, capsys):
    out = tmp_path / "bench.json"
    common = ["bench", "--voc-root", str(drawn_voc), "--split", "test", "--images", "1",
              "--preset", "small", "--rcnn-sample", "2", "--no-multiscale", "--jobs", "1",
              "--workdir", str(tmp_path / "w"), "--device", "cpu"]
    assert main(common + ["--variants", "dedup,svd", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SPP-net +dedup" in printed and "mAP delta not measured" in printed
    summary = json.loads(out.read_text())
    assert set(summary["variants"]) == {"dedup", "svd"}
    for row in summary["variants"].values():
        assert set(row) >= {"conv_s", "fc_s", "total_s", "speedup", "mAP_delta"}
    assert main(common + ["--variants", "dedup,turbo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "turbo" in err and len(err.splitlines()) == 1


def test_scales_option_names_the_presets_sets():
    from data.errors import SppnetError
    from detection.cli import _parse_scales
    from detection.presets import get_preset

    small, paper = get_preset("small"), get_preset("paper")
    assert _parse_scales("1", small) == (small.scale,)
    assert _parse_scales("multi", small) == _parse_scales("5", small) == small.multi_scales
    assert _parse_scales("multi", paper) == (480, 576, 688, 864, 1200)
    assert _parse_scales("480,688", paper) == (480, 688)
    assert _parse_scales(None, paper) is None
    with pytest.raises(SppnetError, match="expected 1, multi"):
        _parse_scales("many", small)


def test_train_memory_option_sets_both_cache_budgets(drawn_voc, tmp_path, monkeypatch, capsys):
    """`train --memory GIB` reaches both training caches; a bad value is a one-line usage error."""
    import detection.pipeline as pipeline

    seen = {}

    def fake_train(dataset, method, preset, workdir, settings, *args, **kwargs):
        seen["settings"] = settings
        return tmp_path / "model.pt", {"images": len(dataset.images), "seconds": 0.0}

    monkeypatch.setattr(pipeline, "train_detector", fake_train)
    status = main(["train", "--voc-root", str(drawn_voc), "--split", "test", "--method",
                   "spp", "--memory", "0.5", "--workdir", str(tmp_path / "w"), "--quiet"])
    assert status == 0
    assert seen["settings"].conv5_memory == seen["settings"].pretrain_crop_memory == 0.5
    for bad in ("-1", "lots", "inf"):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--voc-root", str(drawn_voc), "--split", "test", "--method",
                  "spp", "--memory", bad])
        assert exit_info.value.code == 2
        assert "--memory" in capsys.readouterr().err


def test_train_refuses_a_named_class_without_objects(tiny_voc, tmp_path, monkeypatch, capsys):
    """`--classes` naming a class the split has none of (here another case) is a one-line
    error before any work; a class found only in another split's annotations is a warning."""
    import detection.pipeline as pipeline

    trained = []

    def fake_train(dataset, *args, **kwargs):
        trained.append(dataset.classes)
        return tmp_path / "model.pt", {"images": len(dataset.images), "seconds": 0.0}

    monkeypatch.setattr(pipeline, "train_detector", fake_train)
    base = ["train", "--voc-root", str(tiny_voc), "--split", "trainval", "--method", "rcnn",
            "--workdir", str(tmp_path / "w"), "--quiet"]
    assert main(base + ["--classes", "Cat,dog"]) == 2
    err = capsys.readouterr().err
    assert "no objects of class 'Cat' (did you mean 'cat'?)" in err
    assert len(err.strip().splitlines()) == 1 and not trained
    assert main(base) == 0  # bird is only in the test split
    assert "warning:" in capsys.readouterr().err and trained == [("bird", "cat", "dog")]


def _train_help(capsys) -> str:
    """`sppnet train --help` as one line of text."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return " ".join(capsys.readouterr().out.split())


def _assert_rejected(capsys, flag: str, value: str) -> None:
    """`train` with `flag value` is a usage error (exit 2) that names the flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--voc-root", "x", "--split", "t", "--method", "spp", flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_pretrain_epochs_help_names_the_defaults_of_train_and_demo(capsys):
    """The help's numbers are the real defaults (the parser avoids importing torch for them)."""
    from detection.demo import DEMO_PRETRAIN_EPOCHS
    from detection.train import DEFAULT_PRETRAIN_EPOCHS, TrainSettings

    text = _train_help(capsys)
    assert f"`sppnet demo` uses {DEMO_PRETRAIN_EPOCHS})" in text
    assert (f"(default {TrainSettings.pretrain_steps}: {DEFAULT_PRETRAIN_EPOCHS} epochs on about "
            "160 images of 2.5 objects)") in text
    assert TrainSettings.pretrain_minutes == 20
    assert "minutes, judged by its second and third epochs, never below half the budget " \
        "(default 20; 0: the whole budget however long it takes;" in text
    _assert_rejected(capsys, "--pretrain-epochs", "0")
    _assert_rejected(capsys, "--pretrain-steps", "0")
    _assert_rejected(capsys, "--pretrain-minutes", "-1")
    assert main(["train", "--voc-root", "x", "--split", "t", "--method", "spp",
                 "--pretrain-epochs", "5", "--pretrain-minutes", "10"]) != 0
    assert "--pretrain-epochs N runs exactly N epochs; --pretrain-minutes caps" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--voc-root", "x", "--split", "t", "--method", "spp",
              "--pretrain-epochs", "5", "--pretrain-steps", "100"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_pretraining_augmentation_help_and_bounds(capsys):
    from detection.train import PRECISION_CHOICES, TrainSettings

    text = _train_help(capsys)
    assert f"every N epochs (default {TrainSettings.pretrain_redraw}; 0: once)" in text
    assert f"(default {TrainSettings.pretrain_color}; 0: none)" in text
    assert TrainSettings.pretrain_hue is None
    assert "(brightness): for classes told apart by their colour (default: all of it;" in \
        " ".join(text.split())
    assert f"GPUs included (default {TrainSettings.pretrain_precision})" in text
    assert TrainSettings.pretrain_aspect is False
    assert "--pretrain-aspect, --no-pretrain-aspect" in text and \
        "as R-CNN's warps do (default: off)" in " ".join(text.split())
    assert "--pretrain-precision {" + ",".join(PRECISION_CHOICES) + "}" in text
    for flag, bad in (("--pretrain-color", "1"), ("--pretrain-color", "-0.1"),
                      ("--pretrain-hue", "-0.1"),
                      ("--pretrain-redraw", "-1"), ("--pretrain-precision", "fp16")):
        _assert_rejected(capsys, flag, bad)
