"""`sppnet demo`'s training schedule: the demo pre-trains for fewer epochs than `train`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import detection.demo as demo
from detection.train import DEFAULT_PRETRAIN_EPOCHS, TrainSettings


def test_the_demo_trains_with_its_shorter_pretraining(tmp_path, monkeypatch):
    (tmp_path / "demo-data").mkdir()
    (tmp_path / "demo-data" / "demo.json").write_text("{}")
    monkeypatch.setattr(demo, "open_voc", lambda root, split, classes=None: SimpleNamespace(
        name="demo-data", classes=("a",), split=split))
    seen = {}

    class Stop(Exception):
        pass

    def fake_train(dataset, method, preset, workdir, settings, *args, **kwargs):
        seen["settings"] = settings
        raise Stop

    monkeypatch.setattr(demo, "train_detector", fake_train)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path, torch.device("cpu"), seed=5, quiet=True)
    settings = seen["settings"]
    assert settings.seed == 5
    assert settings.pretrain_epochs == demo.DEMO_PRETRAIN_EPOCHS < DEFAULT_PRETRAIN_EPOCHS
    # `train`'s recipe (its augmentation and flips included), shorter and in fp32 on every host
    assert settings == TrainSettings(seed=5, pretrain_epochs=demo.DEMO_PRETRAIN_EPOCHS,
                                     pretrain_precision="fp32")
    assert settings.pretrain_redraw > 0 and settings.pretrain_color > 0 and settings.spp_mirror
    assert TrainSettings().pretrain_precision == "auto"
