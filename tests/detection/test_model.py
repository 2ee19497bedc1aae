"""`Detector`: detections of several images at once (the `batch` speedup) equal one at a time,
a saved detector loads back with the same outputs, and the mirror pass averages the two views."""

from __future__ import annotations

import numpy as np
import pytest
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
    from detection.features import ConvMaps, conv_maps

    base = _detector()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (130, 170, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 30, 28], [40, 30, 150, 110], [0, 0, 169, 129], [60, 70, 75, 90]],
                     np.float32)
    every = [96, 160, 240]
    with torch.inference_mode():
        conv = conv_maps(base.net, image, every, base.preset.max_side)
    with torch.inference_mode():
        mirrored = conv_maps(base.net, np.ascontiguousarray(image[:, ::-1]), every,
                             base.preset.max_side)
    for scales in [(160,), (96, 240), (96, 160, 240)]:
        at = [every.index(s) for s in scales]
        own = ConvMaps([conv.factors[k] for k in at], [conv.maps[k] for k in at])
        own_mirrored = ConvMaps([mirrored.factors[k] for k in at],
                                [mirrored.maps[k] for k in at])
        for test_mirror in (False, True):
            detector = Detector(base.net, "spp", base.classes, base.preset, scales, base.fc8,
                                scorer="softmax", test_mirror=test_mirror)
            got = detector.detect_from_maps(image, boxes, own, mirrored_conv=own_mirrored)
            want = detector.detect(image, boxes)
            assert len(want["scores"]) > 0
            for key in ("boxes", "labels", "scores"):
                assert torch.equal(got[key], want[key])
    with pytest.raises(ValueError, match="mirror"):     # the mirror pass needs its maps
        detector.detect_from_maps(image, boxes, conv)
    rcnn = Detector(base.net, "rcnn", base.classes, base.preset, (160,), base.fc8,
                    scorer="softmax")
    with pytest.raises(ValueError):
        rcnn.detect_from_maps(image, boxes, conv)


@pytest.mark.parametrize("method,batch", [("spp", False), ("spp", True), ("rcnn", False)])
def test_a_photo_beyond_the_largest_input_is_read_shrunk_and_answered_in_its_own_pixels(
        method, batch):
    """A photo twice the preset's largest input is shrunk to it before detection, as training
    holds it: an image made of 2x2 copies of each pixel gives the detections of the image
    itself, with its boxes in the large photo's pixels."""
    from detection.boxes import scale_boxes

    base = _detector()
    preset = base.preset.with_changes(scale=120, multi_scales=(120,), max_side=400)
    detector = Detector(base.net, method, base.classes, preset, (120,), base.fc8,
                        scorer="softmax")
    if batch:
        detector = variant_detector(detector, parse_variant("batch"))
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    large = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    boxes = torch.tensor([[5, 5, 80, 90], [40, 30, 150, 110], [0, 0, 159, 119]],
                         dtype=torch.float32)
    want = detector.detect_many([small], [boxes])[0]
    got = detector.detect_many([large], [scale_boxes(boxes, 2.0, 2.0)])[0]
    assert len(want["scores"]) > 0
    assert torch.allclose(got["scores"], want["scores"], atol=1e-5)
    assert torch.allclose(got["boxes"], scale_boxes(want["boxes"], 2.0, 2.0), atol=1e-3)


def _sorted(det: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.argsort(det["scores"], descending=True)
    return det["boxes"][order], det["labels"][order], det["scores"][order]


def _mirror_det(det: dict, width: int) -> dict:
    from detection.boxes import mirror_boxes

    return {**det, "boxes": mirror_boxes(det["boxes"], width)}


@pytest.mark.parametrize("method", ["spp", "rcnn"])
def test_the_mirror_pass_sees_an_image_and_its_mirror_alike(method):
    """With the mirror pass, detecting on the flipped image gives the flipped detections: each
    box's scores are the mean of the same two views. One pass alone does not (a net's filters
    are not symmetric), so the check can fail."""
    from dataclasses import replace

    from detection.boxes import mirror_boxes

    detector = replace(_detector(), method=method)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (120, 170, 3), dtype=np.uint8)
    flipped = np.ascontiguousarray(image[:, ::-1])
    boxes = torch.tensor([[5, 5, 80, 90], [40, 30, 150, 110], [0, 0, 169, 119],
                          [100, 20, 160, 60]], dtype=torch.float32)
    width = image.shape[1]
    for test_mirror in (True, False):
        detector.test_mirror = test_mirror
        want = _sorted(_mirror_det(detector.detect(image, boxes), width))
        got = _sorted(detector.detect(flipped, mirror_boxes(boxes, width)))
        same = (len(got[2]) == len(want[2]) and torch.allclose(got[2], want[2], atol=1e-6)
                and torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0]))
        assert same == test_mirror


class _ShiftRight:
    """A stand-in box regressor that moves every box 3 px to the right, for both classes."""

    def predict(self, features, proposals):
        return (proposals + torch.tensor([3.0, 0.0, 3.0, 0.0]))[:, None].expand(-1, 2, -1)


def test_the_mirror_pass_maps_its_regressed_boxes_back():
    """The mirror image's regressed boxes are flipped back before the mean: a regressor that
    moves boxes right moves them left in the original image, so the mean stays put."""
    detector = _detector()
    detector.box_regressor = _ShiftRight()
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    boxes = torch.tensor([[20, 5, 80, 90], [40, 30, 150, 110]], dtype=torch.float32)
    for test_mirror, shift in ((True, 0.0), (False, 3.0)):
        detector.test_mirror = test_mirror
        det = detector.detect(image, boxes, score_threshold=0.0)
        assert len(det["boxes"]) > 0
        moved = boxes + torch.tensor([shift, 0.0, shift, 0.0])
        assert all(any(torch.allclose(box, m) for m in moved) for box in det["boxes"])


def test_box_voting_gives_a_detection_the_same_box_at_any_score_threshold():
    """Votes come from every candidate `eval` would see, so a detection above a higher cut
    (`detect`'s confident one) keeps the box it has in `eval`; without that cut's candidates
    the clusters would shrink and the boxes move."""
    detector = _detector()
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    xy = rng.uniform(0, 60, (40, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(40, 90, (40, 2))], 1),
                         dtype=torch.float32)
    everything = detector.detect(image, boxes)
    top = everything["scores"][:2]
    cut = float(top.mean())                      # only the best detection is above it
    confident = detector.detect(image, boxes, score_threshold=cut)
    above = everything["scores"] > cut
    assert int(above.sum()) == 1
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(confident[key], everything[key][above])
    detector.box_voting = False
    plain = detector.detect(image, boxes)
    assert torch.equal(plain["scores"], everything["scores"])
    # voting moved the best box: candidates below the cut voted for it
    assert not torch.allclose(plain["boxes"][0], everything["boxes"][0])
