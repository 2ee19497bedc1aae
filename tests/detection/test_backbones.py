"""Backbones: output shapes, geometry, checkpoints, torchvision weights from a local file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import models

from data.errors import SppnetError
from detection.backbones import SPECS, build_net, save_checkpoint, trunk_geometry


@pytest.mark.parametrize("name", ["zf5", "zf5_small", "alexnet", "vgg16"])
def test_shapes_of_every_backbone(name):
    net = build_net(name)
    spec = SPECS[name]
    assert net.stride == 16
    with torch.inference_mode():
        crop = torch.zeros(1, 3, spec.crop_size, spec.crop_size)
        conv5 = net.trunk(crop)
        assert conv5.shape[1] == spec.channels
        pool5 = net.pool5(conv5)
        assert pool5.shape[-2:] == (spec.pool5_grid, spec.pool5_grid)
        assert net.rcnn_fc(pool5.flatten(1)).shape == (1, spec.fc_hidden)
        pooled = net.spp(conv5[0], torch.tensor([[0, 0, conv5.shape[-1] - 1, conv5.shape[-2] - 1]]))
        assert net.spp_fc(pooled).shape == (1, spec.fc_hidden)


def test_zf5_geometry_matches_the_original_code():
    net = build_net("zf5")
    assert trunk_geometry(net.trunk) == (16, 20.0)   # 1-based offset 21 in the original code
    with torch.inference_mode():   # 224 px -> 13 x 13 conv5, as ZF-5 in the paper
        assert net.trunk(torch.zeros(1, 3, 224, 224)).shape[-2:] == (13, 13)


def test_preprocess_zf5_is_bgr_minus_128():
    net = build_net("zf5_small")
    image = torch.tensor([[[10, 20, 30]]], dtype=torch.uint8)
    assert net.preprocess(image).flatten().tolist() == [30 - 128, 20 - 128, 10 - 128]


def test_checkpoint_round_trip(tmp_path):
    net = build_net("zf5_small", seed=1)
    path = save_checkpoint(net, tmp_path / "model.pt")
    again = build_net("zf5_small", weights=path, seed=2)
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(SppnetError, match="checkpoint is for backbone 'zf5_small'"):
        build_net("zf5", weights=path)


def test_torchvision_weights_from_a_local_state_dict(tmp_path):
    torch.manual_seed(3)
    reference = models.alexnet(weights=None).eval()
    path = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), path)
    net = build_net("alexnet", weights=path)
    crop = torch.randn(2, 3, 227, 227)
    with torch.inference_mode():
        conv5 = net.trunk(crop)
        ours = net.rcnn_fc(net.pool5(conv5).flatten(1))
        theirs = reference.classifier[:6](torch.flatten(reference.avgpool(reference.features(crop)), 1))
        assert torch.allclose(ours, theirs, atol=1e-5)
        # SPP's fc6 starts as the pretrained fc6 on the 6x6 level: same output on the same pooling
        windows = torch.tensor([[0, 0, conv5.shape[-1] - 1, conv5.shape[-2] - 1]])
        spp = net.spp_fc(net.spp(conv5[0], windows))
        level6 = torch.nn.functional.adaptive_max_pool2d(conv5[:1], 6).flatten(1)
        assert torch.allclose(spp, net.rcnn_fc(level6), atol=1e-5)


def test_bad_weights_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SppnetError, match="not a readable weights file"):
        build_net("zf5_small", weights=junk)
    with pytest.raises(SppnetError, match="not found"):
        build_net("zf5_small", weights=tmp_path / "missing.pt")
    with pytest.raises(SppnetError, match="needs alexnet or vgg16"):
        build_net("zf5", weights="imagenet")
    with pytest.raises(SppnetError, match="unknown backbone"):
        build_net("resnet")


def test_imagenet_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(SppnetError, match="cannot load ImageNet weights for alexnet"):
        build_net("alexnet", weights="imagenet")


@pytest.mark.parametrize("size", [3, 4, 5])
def test_fast_lrn_equals_torch_lrn(size, monkeypatch):
    from detection.backbones import CrossChannelLRN

    x = torch.relu(torch.randn(2, 9, 70, 50)) * 30
    monkeypatch.setattr(CrossChannelLRN, "block_elements", 9 * 50 * 3)   # several row blocks
    for beta in (0.75, 0.6):
        theirs = torch.nn.LocalResponseNorm(size, alpha=1e-3, beta=beta, k=2.0)(x)
        ours = CrossChannelLRN(size, alpha=1e-3, beta=beta, k=2.0)(x)           # row blocks
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        small = x[:, :, :6, :7].contiguous()                                   # whole-image blocks
        expected = torch.nn.LocalResponseNorm(size, alpha=1e-3, beta=beta, k=2.0)(small)
        got = CrossChannelLRN(size, alpha=1e-3, beta=beta, k=2.0)(small)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        trained = CrossChannelLRN(size, alpha=1e-3, beta=beta, k=2.0)(x.requires_grad_())
        assert torch.allclose(trained, theirs, rtol=1e-5, atol=1e-6)            # autograd path
        x = x.detach()


@pytest.mark.parametrize("crop", [64, 99, 131, 163, 227])
def test_pool5_grid_follows_the_crop_size(crop):
    net = build_net("zf5_small", crop_size=crop)
    with torch.inference_mode():
        pool5 = net.pool5(net.trunk(torch.zeros(1, 3, crop, crop)))
        assert pool5.shape[-1] == net.pool5_grid
        assert net.rcnn_fc(pool5.flatten(1)).shape == (1, 512)


def test_pretrained_fc6_needs_its_pool5_grid(tmp_path):
    path = tmp_path / "alexnet.pth"
    torch.save(models.alexnet(weights=None).state_dict(), path)
    with pytest.raises(SppnetError, match="6x6 pool5"):
        build_net("alexnet", weights=path, crop_size=163)


def test_channels_last_trunk_on_the_cpu_gives_the_same_features():
    from detection.backbones import prefer_channels_last
    from detection.features import ExtractSettings, extract

    plain = build_net("zf5_small", seed=0, crop_size=99).eval()
    fast = prefer_channels_last(build_net("zf5_small", seed=0, crop_size=99).eval())
    conv1 = next(m for m in fast.trunk if isinstance(m, torch.nn.Conv2d))
    assert conv1.weight.is_contiguous(memory_format=torch.channels_last)
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    boxes = torch.tensor([[0.0, 0.0, 119.0, 89.0], [10.0, 20.0, 60.0, 70.0]])
    for method in ("spp", "rcnn"):
        a = extract(plain, image, boxes, method, ExtractSettings(scales=(150,), max_side=400))
        b = extract(fast, image, boxes, method, ExtractSettings(scales=(150,), max_side=400))
        assert torch.allclose(a, b, atol=1e-5)
