"""train and eval end to end on a tiny drawn dataset (a smoke run: every stage, resumable
model files, the outputs eval promises), and the detector file round trip."""

from __future__ import annotations

import json

import pytest
import torch

from detection.cli import main
from detection.model import load_detector




@pytest.mark.parametrize("method", ["spp", "rcnn"])
def test_train_then_eval(drawn_voc, tmp_path, method, capsys):
    work = tmp_path / "work"
    common = ["--voc-root", str(drawn_voc), "--method", method, "--workdir", str(work),
              "--jobs", "1", "--quiet", "--device", "cpu"]
    scorer = ["--scorer", "svm"] if method == "rcnn" else []     # both scorers are exercised
    assert main(["train", "--split", "test", *common, "--pretrain-epochs", "1",
                 "--finetune-iters", "3", *scorer, "--json", str(tmp_path / "train.json")]) == 0
    model = work / "models" / "drawn-small" / f"{method}.pt"
    assert model.is_file() and (work / "models" / "drawn-small" / "trunk.pt").is_file()
    out = tmp_path / "eval"
    assert main(["eval", "--split", "test", *common, "--out", str(out),
                 "--json", str(tmp_path / "eval.json")]) == 0
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert set(summary) >= {"mAP", "ap", "method", "scales"} and summary["method"] == method
    assert 0.0 <= summary["mAP"] <= 1.0 and list(summary["ap"]) == ["box"]
    for name in ("comp4_det_test_box.txt", "pr_curves.png", "report.md"):
        assert (out / name).is_file()
    # the detector file loads without unpickling and detects the same
    detector = load_detector(model)
    assert detector.method == method and detector.classes == ("box",)
    assert (detector.svm is not None) == (method == "rcnn")
    assert summary["scorer"] == ("svm" if method == "rcnn" else "softmax")
    assert "mAP" in capsys.readouterr().out


def test_eval_without_a_model_is_a_one_line_error(drawn_voc, tmp_path, capsys):
    status = main(["eval", "--voc-root", str(drawn_voc), "--split", "test", "--method", "spp",
                   "--workdir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "no trained spp model" in err and len(err.splitlines()) == 1
