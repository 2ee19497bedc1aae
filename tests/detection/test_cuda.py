"""The CUDA path (skipped without a GPU): SPP pooling against AdaptiveMaxPool2d on the device,
both methods' features against the CPU's, lower precisions, and the stage timer's sync."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detection.backbones import build_net
from detection.features import ExtractSettings, extract
from detection.spp import spp_pool
from detection.speedups import apply_variant, parse_variant
from detection.timing import StageTimer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def nets():
    cpu = build_net("zf5", seed=0, crop_size=227).eval()
    gpu = build_net("zf5", seed=0, crop_size=227).eval().cuda()
    return cpu, gpu


@pytest.fixture(scope="module")
def image_and_boxes(random_scene):
    image, boxes = random_scene(0, 375, 500, 300, 300, (8, 300))
    return image, torch.tensor(boxes, dtype=torch.float32)


def test_spp_pool_on_the_gpu_equals_adaptive_max_pool():
    torch.manual_seed(0)
    fmap = torch.randn(16, 23, 31, device="cuda")
    x1, y1 = torch.randint(0, 31, (200,)), torch.randint(0, 23, (200,))
    windows = torch.stack([x1, y1, (x1 + torch.randint(0, 12, (200,))).clamp(max=30),
                           (y1 + torch.randint(0, 12, (200,))).clamp(max=22)], 1)
    windows[:5, 2:] = windows[:5, :2]                          # 1-cell windows
    ours = spp_pool(fmap, windows.cuda(), (1, 2, 3, 6))
    for row, (a, b, c, d) in enumerate(windows.tolist()):
        crop = fmap[:, b:d + 1, a:c + 1]
        expected = torch.cat([nn.AdaptiveMaxPool2d(n)(crop).flatten() for n in (1, 2, 3, 6)])
        assert torch.equal(ours[row], expected)


@pytest.mark.parametrize("method", ["spp", "rcnn"])
def test_gpu_features_match_the_cpu(nets, image_and_boxes, method):
    cpu, gpu = nets
    image, boxes = image_and_boxes
    settings = ExtractSettings(scales=(480, 688), max_side=2000)
    timer = StageTimer("cuda")
    ours = extract(gpu, image, boxes, method, settings, timer).cpu()
    reference = extract(cpu, image, boxes, method, settings)
    assert set(timer.seconds) >= {"conv", "fc"}
    scale = float(reference.abs().max())
    assert float((ours - reference).abs().max()) < 2e-2 * scale      # TF32 convolutions


@pytest.mark.parametrize("name", ["fp16", "bf16", "dedup+svd+channels_last+fp16"])
def test_lower_precisions_run_on_the_gpu(nets, image_and_boxes, name):
    _, gpu = nets
    image, boxes = image_and_boxes
    plain = ExtractSettings(scales=(688,), max_side=2000)
    vnet, settings = apply_variant(gpu, plain, parse_variant(name))
    reference = extract(gpu, image, boxes, "spp", plain)
    ours = extract(vnet, image, boxes, "spp", settings)
    assert ours.dtype == torch.float32
    cosine = nn.functional.cosine_similarity(ours, reference, dim=1)
    assert float(cosine.min()) > (0.5 if "svd" in name else 0.98)
