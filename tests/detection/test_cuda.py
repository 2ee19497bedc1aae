"""The CUDA path (skipped without a GPU): SPP pooling against AdaptiveMaxPool2d on the device,
both methods' features against the CPU's, lower precisions, the stage timer's sync, the pooling of
SPP-net's fine-tuning against the CPU's, and both methods' fine-tuning on the device."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detection.backbones import build_net
from detection.features import ExtractSettings, extract
from detection.spp import spp_pool, spp_pool_maps
from detection.speedups import apply_variant, parse_variant
from detection.timing import StageTimer
from detection.train import TrainSettings, cached_conv5, finetune

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_windows_of_several_maps_pool_on_the_gpu_as_on_the_cpu(dtype):
    """SPP-net fine-tuning's pooling (maps side by side on one canvas) gives the CPU's numbers."""
    g = torch.Generator().manual_seed(1)
    sizes = [(7, 9), (12, 5), (3, 14), (30, 41)]
    fmaps = [torch.randn(8, h, w, generator=g).to(dtype) for h, w in sizes]
    rows = []
    for k, (h, w) in enumerate(sizes):
        x1, y1 = torch.randint(0, w, (20,), generator=g), torch.randint(0, h, (20,), generator=g)
        x2 = (x1 + torch.randint(0, w, (20,), generator=g)).clamp(max=w - 1)
        y2 = (y1 + torch.randint(0, h, (20,), generator=g)).clamp(max=h - 1)
        rows.append(torch.stack([torch.full((20,), k), x1, y1, x2, y2], 1))
    windows = torch.cat(rows)
    cpu = spp_pool_maps(fmaps, windows, (1, 2, 3, 6))
    gpu = spp_pool_maps([m.cuda() for m in fmaps], windows.cuda(), (1, 2, 3, 6))
    assert gpu.dtype == torch.float32 and torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("method", ["spp", "rcnn"])
def test_finetuning_runs_on_the_gpu(images, tmp_path, method):
    """Both methods fine-tune on the GPU (SPP-net from conv5 maps cached by a GPU pass)."""
    net = build_net("zf5_small", seed=0, crop_size=64).cuda()
    settings = TrainSettings(seed=0, finetune_iters=4, finetune_batch=16, finetune_images=2)
    scales = (96, 160)
    maps = mirrored = None
    if method == "spp":          # the maps of the images and of their mirror images
        maps, mirrored = (cached_conv5(net, images, scales, 400, tmp_path / "conv5", quiet=True,
                                       mirrored=flip) for flip in (False, True))
    head = net.spp_fc if method == "spp" else net.rcnn_fc
    before = [p.detach().clone() for p in head.parameters()]
    fc8, log = finetune(net, method, images, 1, settings, torch.device("cuda"), scales, 400,
                        quiet=True, maps=maps, mirrored_maps=mirrored)
    assert next(fc8.parameters()).is_cuda
    assert log["iterations"] == 4 and math.isfinite(log["final_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
