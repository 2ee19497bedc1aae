"""Speedup switches: truncated SVD against the best low-rank approximation, `dedup` exact,
channels-last and autocast close to fp32, variant names checked, and the net left unchanged."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from data.errors import SppnetError
from detection.backbones import build_net
from detection.features import ExtractSettings, extract
from detection.speedups import (apply_variant, default_svd_ranks, low_rank_linear, parse_variant,
                                truncated_head)


@pytest.fixture(scope="module")
def image_and_boxes(random_scene):
    image, boxes = random_scene(1, 120, 160, 40, 100, (10, 80))
    boxes[20:30] = boxes[:10] + 0.5           # same conv5 windows as the first ten
    return image, torch.tensor(boxes, dtype=torch.float32)


def test_low_rank_linear_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    layer = nn.Linear(30, 20)
    x = torch.randn(7, 30)
    full = low_rank_linear(layer, 20)
    assert torch.allclose(full(x), layer(x), atol=1e-5)
    truncated = low_rank_linear(layer, 5)
    assert [m.weight.shape for m in truncated] == [(5, 30), (20, 5)]
    product = (truncated[1].weight @ truncated[0].weight).detach()
    singular = torch.linalg.svdvals(layer.weight.detach())
    error = float(torch.linalg.matrix_norm(product - layer.weight.detach()))
    assert error == pytest.approx(float(singular[5:].square().sum().sqrt()), rel=1e-4)


def test_truncated_head_keeps_fc7_when_truncating_it_saves_nothing():
    head = build_net("zf5_small", seed=0).spp_fc
    hidden = head.fc7.out_features
    six, seven = default_svd_ranks(hidden)
    assert six < hidden and seven <= hidden
    out = truncated_head(head, (six, hidden // 2))
    assert isinstance(out.fc6, nn.Sequential) and isinstance(out.fc7, nn.Linear)
    assert isinstance(head.fc6, nn.Linear)                  # the original is untouched
    smaller = truncated_head(head, (six, hidden // 4))
    assert isinstance(smaller.fc7, nn.Sequential)


def test_dedup_gives_the_same_features(net, image_and_boxes):
    image, boxes = image_and_boxes
    plain = ExtractSettings(scales=(200, 300), max_side=800)
    vnet, settings = apply_variant(net, plain, parse_variant("dedup"))
    assert vnet is net and settings.dedup
    pooled, fc7 = extract(net, image, boxes, "spp", plain, return_pooled=True)
    pooled_d, fc7_d = extract(vnet, image, boxes, "spp", settings, return_pooled=True)
    assert torch.allclose(fc7_d, fc7, atol=1e-6) and torch.allclose(pooled_d, pooled, atol=1e-6)


@pytest.mark.parametrize("name", ["channels_last", "bf16", "svd", "int8"])
def test_switches_stay_close_to_plain(net, image_and_boxes, name):
    image, boxes = image_and_boxes
    plain = ExtractSettings(scales=(200,), max_side=800)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    vnet, settings = apply_variant(net, plain, parse_variant(name))
    for method in ("spp", "rcnn"):
        reference = extract(net, image, boxes[:8], method, plain)
        ours = extract(vnet, image, boxes[:8], method, settings)
        assert ours.dtype == torch.float32 and ours.shape == reference.shape
        cosine = nn.functional.cosine_similarity(ours, reference, dim=1)
        limit = {"channels_last": 0.99999, "bf16": 0.99, "svd": 0.5, "int8": 0.99}[name]
        assert float(cosine.min()) > limit
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_variant_names_are_checked():
    assert parse_variant("dedup+svd+bf16") == ("dedup", "svd", "bf16")
    for bad in ("", "fast", "dedup+warp", "bf16+fp16", "int8+bf16"):
        with pytest.raises(SppnetError):
            parse_variant(bad)


def test_batched_conv_equals_one_image_at_a_time(net):
    from detection.features import conv_maps, conv_maps_batch, extract_batch

    rng = np.random.default_rng(3)
    same = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(2)]
    other = rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)
    with torch.inference_mode():
        for image, maps in zip(same, conv_maps_batch(net, same, (150, 200), 800)):
            alone = conv_maps(net, image, (150, 200), 800)
            assert maps.factors == alone.factors
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(maps.maps, alone.maps))
        padded = conv_maps_batch(net, [same[0], other], (150,), 800)      # other is padded
        assert padded[1].maps[0].shape == conv_maps(net, other, (150,), 800).maps[0].shape
    boxes = [torch.tensor([[5.0, 5.0, 80.0, 90.0], [40.0, 30.0, 85.0, 95.0]])] * 3
    _, settings = apply_variant(net, ExtractSettings(scales=(150,), max_side=800),
                                parse_variant("batch"))
    images = [same[0], other, same[1]]                    # grouped by size, order kept
    together = extract_batch(net, images, boxes, replace(settings, batch_images=2))
    for k in (0, 2):
        assert torch.allclose(together[k], extract(net, images[k], boxes[k], "spp", settings),
                              atol=1e-5)
    assert together[1].shape == (2, net.feature_dim)
