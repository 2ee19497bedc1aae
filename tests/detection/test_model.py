"""`Detector`: detections of several images at once (the `batch` speedup) equal one at a time,
and a saved detector loads back with the same outputs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from detection.backbones import build_net
from detection.model import Detector, load_detector
from detection.presets import get_preset
from detection.speedups import parse_variant, variant_detector


def _detector() -> Detector:
    net = build_net("zf5_small", seed=0, crop_size=99).eval()
    torch.manual_seed(0)
    fc8 = nn.Linear(net.feature_dim, 3).eval()
    return Detector(net, "spp", ("a", "b"), get_preset("small"), (160,), fc8, scorer="softmax")


def test_detect_many_with_batched_conv_equals_detect(tmp_path):
    detector = _detector()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(3)]
    proposals = [np.array([[5, 5, 80, 90], [40, 30, 150, 110], [0, 0, 159, 119]], np.float32)] * 2
    proposals.append(np.zeros((0, 4), np.float32))
    batched = variant_detector(detector, parse_variant("batch"))
    assert batched.settings.batch_images > 1 and detector.settings.batch_images == 1
    for got, image, boxes in zip(batched.detect_many(images, proposals), images, proposals):
        want = detector.detect(image, boxes)
        assert set(got) == {"boxes", "labels", "scores"}
        assert torch.allclose(got["scores"], want["scores"], atol=1e-5)
        assert torch.equal(got["labels"], want["labels"])
    loaded = load_detector(detector.save(tmp_path / "spp.pt"))
    again = loaded.detect(images[0], proposals[0])
    assert torch.allclose(again["scores"], detector.detect(images[0], proposals[0])["scores"],
                          atol=1e-5)


def test_detect_from_shared_maps_equals_detect():
    """Maps computed once at a superset of scales give each scale subset what `detect` gives
    (the test-scale choice relies on it)."""
    import pytest

    from detection.features import ConvMaps, conv_maps

    base = _detector()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (130, 170, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 30, 28], [40, 30, 150, 110], [0, 0, 169, 129], [60, 70, 75, 90]],
                     np.float32)
    every = [96, 160, 240]
    with torch.inference_mode():
        conv = conv_maps(base.net, image, every, base.preset.max_side)
    for scales in [(160,), (96, 240), (96, 160, 240)]:
        detector = Detector(base.net, "spp", base.classes, base.preset, scales, base.fc8,
                            scorer="softmax")
        at = [every.index(s) for s in scales]
        own = ConvMaps([conv.factors[k] for k in at], [conv.maps[k] for k in at])
        got, want = detector.detect_from_maps(image, boxes, own), detector.detect(image, boxes)
        assert len(want["scores"]) > 0
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(got[key], want[key])
    rcnn = Detector(base.net, "rcnn", base.classes, base.preset, (160,), base.fc8,
                    scorer="softmax")
    with pytest.raises(ValueError):
        rcnn.detect_from_maps(image, boxes, conv)
