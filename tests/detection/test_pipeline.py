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
    assert json.loads((tmp_path / "train.json").read_text())["finetune"]["images"] == 3
    assert model.is_file() and (work / "models" / "drawn-small" / "trunk.pt").is_file()
    out = tmp_path / "eval"
    assert main(["eval", "--split", "test", *common, "--out", str(out),
                 "--json", str(tmp_path / "eval.json")]) == 0
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert set(summary) >= {"mAP", "ap", "method", "scales"} and summary["method"] == method
    assert 0.0 <= summary["mAP"] <= 1.0 and list(summary["ap"]) == ["box"]
    assert summary["test_mirror"] is True          # the mirror pass is on by default
    assert summary["box_voting"] is True           # and so is box voting
    assert summary["conv_fine_tuned"] is (method == "rcnn")     # SPP-net's paper: fc only
    assert "beyond the SPP-net paper" not in (out / "report.md").read_text()
    for name in ("comp4_det_test_box.txt", "pr_curves.png", "report.md"):
        assert (out / name).is_file()
    # the detector file loads without unpickling and detects the same
    detector = load_detector(model)
    assert detector.method == method and detector.classes == ("box",)
    assert (detector.svm is not None) == (method == "rcnn")
    assert summary["scorer"] == ("svm" if method == "rcnn" else "softmax")
    captured = capsys.readouterr()
    printed = captured.out
    assert "mAP" in printed
    assert "warning:" not in captured.err and "note:" not in captured.err  # classes all match
    # R-CNN reads its windows from warps of the original image, SPP-net from its image scales
    if method == "rcnn":
        assert summary["scales"] == [] and summary["warp_px"] == detector.net.crop_size
        assert f"regions warped to {detector.net.crop_size} px" in printed
        assert f"regions warped to {detector.net.crop_size}×" in (out / "report.md").read_text()
    else:
        assert summary["scales"] == list(detector.scales) and "warp_px" not in summary
        assert (f"({'+'.join(map(str, detector.scales))} px, softmax, mirror pass, "
                f"box voting)") in printed
    assert main(["eval", "--split", "test", *common, "--out", str(tmp_path / "one-pass"),
                 "--no-test-mirror", "--no-box-voting",
                 "--json", str(tmp_path / "one-pass.json")]) == 0
    one_pass = json.loads((tmp_path / "one-pass.json").read_text())
    assert one_pass["test_mirror"] is False and one_pass["box_voting"] is False
    printed = capsys.readouterr().out
    assert "mirror pass" not in printed and "box voting" not in printed
    assert "no box voting" in (tmp_path / "one-pass" / "report.md").read_text()
    # result files never go into the dataset
    inside = drawn_voc / "results"
    for option in ("--out", "--json"):
        paths = {"--out": str(tmp_path / "o"), "--json": str(tmp_path / "o.json"),
                 option: str(inside)}
        assert main(["eval", "--split", "test", *common, *(x for kv in paths.items()
                                                          for x in kv)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{option} {inside}: inside the dataset {drawn_voc}" in err
        assert len(err.splitlines()) == 1 and not inside.exists()


def test_scales_is_an_spp_option(drawn_voc, tmp_path, capsys):
    for command in (["train", "--split", "test"], ["eval", "--split", "test", "--out",
                                                     str(tmp_path / "out")]):
        assert main([*command, "--voc-root", str(drawn_voc), "--method", "rcnn", "--scales",
                     "1", "--workdir", str(tmp_path / "work"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--scales sets SPP-net's image scales" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_finetune_bg_min_must_leave_a_background_range(drawn_voc, tmp_path, capsys):
    assert main(["train", "--split", "test", "--voc-root", str(drawn_voc), "--method", "spp",
                 "--finetune-bg-min", "0.5", "--workdir", str(tmp_path / "work"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--finetune-bg-min 0.5: must be below 0.5" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "work").exists()


def test_spp_scale_is_chosen_on_held_out_images_then_all_are_trained_on(tmp_path, voc_writer,
                                                                       draw, monkeypatch):
    from PIL import Image

    import detection.train as train

    progress_files = []
    real = train.finetune

    def recording(*args, **kwargs):
        progress_files.append(args[10])
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "finetune", recording)

    images, pixels = {}, {}
    for i in range(8):
        pixels[f"img{i}"], boxes = draw(i)
        images[f"img{i}"] = (200, 150, [("box", b, 0, 0) for b in boxes])
    root = voc_writer(tmp_path / "eight", images, {"trainval": list(images)})
    for image_id, image in pixels.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    assert main(["train", "--voc-root", str(root), "--split", "trainval", "--method", "spp",
                 "--workdir", str(tmp_path / "work"), "--jobs", "1", "--quiet", "--device",
                 "cpu", "--pretrain-epochs", "1", "--finetune-iters", "10",
                 "--no-box-regression", "--json", str(tmp_path / "train.json")]) == 0
    trained = json.loads((tmp_path / "train.json").read_text())
    chosen = "+".join(map(str, trained["scales"]))
    assert chosen in trained["validation_mAP_by_scale"]          # chosen among the tried ones
    assert trained["finetune"]["images"] == trained["images"] == 8
    # the fit that ranks the scales runs a fifth of the schedule, on the 6 tuning images only
    assert trained["scale_choice_finetune"]["iterations"] == 2
    assert trained["scale_choice_finetune"]["images"] == 6
    assert trained["finetune"]["iterations"] == 10
    # each fit checkpoints to its own file: the ranking fit, run again after a stop in the
    # final fit, never overwrites the final fit's checkpoint
    assert len(progress_files) == 2 and progress_files[0] != progress_files[1]


def test_eval_without_a_model_is_a_one_line_error(drawn_voc, tmp_path, capsys):
    status = main(["eval", "--voc-root", str(drawn_voc), "--split", "test", "--method", "spp",
                   "--workdir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "no trained spp model" in err and len(err.splitlines()) == 1


def test_freeze_conv_is_an_rcnn_ablation_saved_beside_the_rcnn_model(drawn_voc, tmp_path, capsys):
    common = ["train", "--voc-root", str(drawn_voc), "--split", "test", "--workdir",
              str(tmp_path / "work"), "--jobs", "1", "--quiet", "--device", "cpu",
              "--freeze-conv"]
    assert main([*common, "--method", "spp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--freeze-conv" in err and len(err.splitlines()) == 1
    assert main([*common, "--method", "rcnn", "--pretrain-epochs", "1", "--finetune-iters", "2",
                 "--no-box-regression"]) == 0
    folder = tmp_path / "work" / "models" / "drawn-small"
    assert (folder / "rcnn-frozen-conv.pt").is_file() and not (folder / "rcnn.pt").exists()


def test_finetune_conv_is_spps_and_saved_beside_the_spp_model(drawn_voc, tmp_path, capsys):
    """`--finetune-conv` (beyond the paper): an error for R-CNN; for SPP-net a model of its own
    whose trunk differs from the pre-trained one, which `eval --model` reads."""
    work = tmp_path / "work"
    common = ["--voc-root", str(drawn_voc), "--split", "test", "--workdir", str(work),
              "--jobs", "1", "--quiet", "--device", "cpu"]
    assert main(["train", *common, "--method", "rcnn", "--finetune-conv"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--finetune-conv" in err and len(err.splitlines()) == 1
    assert main(["train", *common, "--method", "spp", "--finetune-conv", "--pretrain-epochs",
                 "1", "--finetune-iters", "5", "--no-box-regression"]) == 0
    assert "all layers on whole images" in capsys.readouterr().err
    folder = work / "models" / "drawn-small"
    model = folder / "spp-finetuned-conv.pt"
    assert model.is_file() and not (folder / "spp.pt").exists()
    assert main(["eval", *common, "--method", "spp", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()       # the model trained apart is named
    assert f"--model {model}" in err and len(err.splitlines()) == 1
    trunk = torch.load(folder / "trunk.pt", weights_only=False)["state_dict"]
    tuned = torch.load(model, weights_only=False)["state_dict"]
    assert any(not torch.equal(v, tuned[k]) for k, v in trunk.items()
               if k.startswith("trunk.") and k.endswith("weight"))
    assert main(["eval", *common, "--method", "spp", "--model", str(model), "--out",
                 str(tmp_path / "out"), "--json", str(tmp_path / "eval.json")]) == 0
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["method"] == "spp" and summary["conv_fine_tuned"] is True
    assert "conv layers fine-tuned (beyond the paper)" in capsys.readouterr().out
    assert "beyond the SPP-net paper" in (tmp_path / "out" / "report.md").read_text()


def test_no_mirror_is_an_spp_ablation(drawn_voc, tmp_path, capsys):
    assert main(["train", "--voc-root", str(drawn_voc), "--split", "test", "--workdir",
                 str(tmp_path), "--method", "rcnn", "--no-mirror"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--no-mirror" in err and len(err.splitlines()) == 1


def test_a_trunk_is_reused_only_when_made_with_the_runs_settings(drawn_voc, tmp_path, capsys,
                                                                 monkeypatch):
    """`--pretrain-epochs` (or another pre-training setting) takes effect in a workdir that holds a
    trunk of other settings; the same settings reuse it; a trunk of an earlier version (no
    recorded recipe) is reused with a note."""
    from detection.backbones import load_checkpoint, save_checkpoint, build_net
    from detection.train import TrainSettings

    def train(*extra):
        assert main(["train", "--voc-root", str(drawn_voc), "--split", "test", "--method", "rcnn",
                     "--workdir", str(tmp_path / "work"), "--jobs", "1", "--quiet", "--device",
                     "cpu", "--finetune-iters", "1", "--no-box-regression", *extra]) == 0
        return capsys.readouterr().err

    trunk = tmp_path / "work" / "models" / "drawn-small" / "trunk.pt"
    assert "pre-training" in train("--pretrain-epochs", "1")
    assert load_checkpoint(trunk)["config"]["recipe"]["pretrain_epochs"] == 1
    err = train("--pretrain-epochs", "2")
    assert "pretrain_epochs 1 -> 2" in err and "making it again" in err
    assert load_checkpoint(trunk)["config"]["recipe"]["pretrain_epochs"] == 2
    assert "trunk: reusing" in train("--pretrain-epochs", "2")
    err = train("--pretrain-epochs", "2", "--seed", "1")
    assert "seed 0 -> 1" in err and "making it again" in err
    # a recipe saved before the augmentation and precision settings existed: made without
    # augmentation, in fp32
    config = load_checkpoint(trunk)["config"]
    for key in ("pretrain_redraw", "pretrain_color", "pretrain_precision", "pretrain_hue"):
        del config["recipe"][key]
    save_checkpoint(build_net("zf5_small", trunk, crop_size=99), trunk, config)
    assert "trunk: reusing" in train("--pretrain-epochs", "2", "--seed", "1",
                                     "--pretrain-redraw", "0", "--pretrain-color", "0",
                                     "--pretrain-precision", "fp32")
    err = train("--pretrain-epochs", "2", "--seed", "1", "--pretrain-precision", "fp32")
    assert f"pretrain_color 0.0 -> {TrainSettings.pretrain_color}" in err
    assert f"pretrain_redraw 0 -> {TrainSettings.pretrain_redraw}" in err
    # saved before `--pretrain-hue`: each channel shifted on its own, as a share of S or more
    config = load_checkpoint(trunk)["config"]
    del config["recipe"]["pretrain_hue"]
    save_checkpoint(build_net("zf5_small", trunk, crop_size=99), trunk, config)
    assert "trunk: reusing" in train("--pretrain-epochs", "2", "--seed", "1",
                                     "--pretrain-precision", "fp32", "--pretrain-hue", "0.9")
    assert "trunk: reusing" in train("--pretrain-epochs", "2", "--seed", "1",
                                     "--pretrain-precision", "fp32")
    err = train("--pretrain-epochs", "2", "--seed", "1", "--pretrain-precision", "fp32",
                "--pretrain-hue", "0.15")
    assert "pretrain_hue None -> 0.15" in err and "making it again" in err
    err = train("--pretrain-epochs", "2", "--seed", "1", "--pretrain-precision", "bf16")
    assert "pretrain_precision fp32 -> bf16" in err and "making it again" in err
    # "auto" (the default) records the precision it chose, and the log says why
    monkeypatch.setattr("detection.train.native_cpu_bf16", lambda: False)
    err = train("--pretrain-epochs", "2", "--seed", "1")
    assert "pretrain_precision bf16 -> fp32" in err and "SPP head, fp32: auto on this CPU" in err
    assert load_checkpoint(trunk)["config"]["recipe"]["pretrain_precision"] == "fp32"
    monkeypatch.setattr("detection.train.native_cpu_bf16", lambda: True)
    err = train("--pretrain-epochs", "2", "--seed", "1")
    assert "pretrain_precision fp32 -> bf16" in err and "SPP head, bf16: auto on this CPU" in err
    assert "trunk: reusing" in train("--pretrain-epochs", "2", "--seed", "1",
                                     "--pretrain-precision", "bf16")
    # saved before `--pretrain-aspect`: squashed context crops
    config = load_checkpoint(trunk)["config"]
    del config["recipe"]["pretrain_aspect"]
    save_checkpoint(build_net("zf5_small", trunk, crop_size=99), trunk, config)
    assert "trunk: reusing" in train("--pretrain-epochs", "2", "--seed", "1",
                                     "--pretrain-precision", "bf16", "--no-pretrain-aspect")
    err = train("--pretrain-epochs", "2", "--seed", "1", "--pretrain-precision", "bf16",
                "--pretrain-aspect")
    assert "pretrain_aspect False -> True" in err and "making it again" in err
    assert load_checkpoint(trunk)["config"]["recipe"]["pretrain_aspect"] is True
    config = load_checkpoint(trunk)["config"]
    del config["recipe"]                                     # as an earlier version saved it
    save_checkpoint(build_net("zf5_small", trunk, crop_size=99), trunk, config)
    err = train("--pretrain-epochs", "3")
    assert "trunk: reusing" in err and "earlier version" in err


def test_a_trunk_is_reused_by_any_schedule_that_makes_the_same_epochs(drawn_voc, tmp_path,
                                                                      capsys):
    """The epochs and the step budget count through the epochs they give: a trunk made by
    asking for N epochs, or saved before the budget existed, serves a run whose budget gives N
    epochs; a budget that gives others makes it again."""
    from detection.backbones import load_checkpoint, save_checkpoint, build_net

    def train(*extra):
        assert main(["train", "--voc-root", str(drawn_voc), "--split", "test", "--method", "rcnn",
                     "--workdir", str(tmp_path / "work"), "--jobs", "1", "--quiet", "--device",
                     "cpu", "--finetune-iters", "1", "--no-box-regression",
                     "--pretrain-precision", "fp32", *extra]) == 0
        return capsys.readouterr().err

    trunk = tmp_path / "work" / "models" / "drawn-small" / "trunk.pt"
    assert "pre-training" in train("--pretrain-epochs", "2")
    config = load_checkpoint(trunk)["config"]
    assert config["recipe"]["pretrain_epochs"] == 2 and config["log"]["epochs"] == 2
    per_epoch = config["log"]["steps"] // 2
    assert "trunk: reusing" in train("--pretrain-steps", str(2 * per_epoch))
    del config["recipe"]["pretrain_steps"]                       # saved before the budget
    del config["log"]["epochs"]
    save_checkpoint(build_net("zf5_small", trunk, crop_size=99), trunk, config)
    assert "trunk: reusing" in train("--pretrain-steps", str(3 * per_epoch - 1))
    err = train("--pretrain-steps", str(per_epoch))
    assert "making it again" in err and "pretrain_epochs 2 -> the budget's" in err
    assert f"1 epoch of {per_epoch} steps" in err
    assert load_checkpoint(trunk)["config"]["log"]["epochs"] == 1
    assert "trunk: reusing" in train("--pretrain-epochs", "1")
    assert "making it again" in train("--pretrain-epochs", "2")


def test_a_trunk_the_time_cap_cut_short_serves_only_runs_under_that_cap():
    """One that ran its whole budget serves a run under any cap (or none), one made before the
    cap existed included."""
    from detection.pipeline import same_trunk_recipe, trunk_recipe
    from detection.train import EARLIER_RECIPE, TrainSettings

    def recipe(minutes):
        return trunk_recipe(TrainSettings(pretrain_steps=800, pretrain_minutes=minutes), None)

    whole, cut = {"epochs": 8, "steps": 800}, {"epochs": 5, "steps": 500, "budget_epochs": 8}
    assert same_trunk_recipe(recipe(20.0), recipe(20.0), cut)
    assert not same_trunk_recipe(recipe(20.0), recipe(0.0), cut)
    assert not same_trunk_recipe(recipe(20.0), recipe(30.0), cut)
    assert same_trunk_recipe(recipe(20.0), recipe(0.0), whole)
    before_the_cap = {k: v for k, v in recipe(20.0).items() if k != "pretrain_minutes"}
    assert same_trunk_recipe({**EARLIER_RECIPE, **before_the_cap}, recipe(20.0), whole)


def test_a_trunk_recipe_names_what_changed():
    from detection.pipeline import _recipe_change, trunk_recipe
    from detection.train import TrainSettings

    here = trunk_recipe(TrainSettings(), None)
    budgets = TrainSettings(conv5_memory=0.5, pretrain_crop_memory=0.1)
    assert trunk_recipe(budgets, "random") == here
    assert _recipe_change(here, trunk_recipe(TrainSettings(pretrain_epochs=3, seed=2), None)) == \
        "pretrain_epochs the budget's -> 3, seed 0 -> 2"
    assert _recipe_change(here, trunk_recipe(TrainSettings(), "imagenet")) == \
        "pre-trained here -> weights imagenet"
    imagenet = trunk_recipe(TrainSettings(), "imagenet")
    assert trunk_recipe(TrainSettings(seed=4), "imagenet") == imagenet
