"""oneDNN's fp32 linear on the CPU: the numbers of `nn.Linear` up to rounding, only where it
applies (inference, fp32, no autocast), and never stale after the weights change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detection import onednn
from detection.backbones import FCHead


def _layer() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(300, 70)


def test_inference_matches_nn_linear_up_to_rounding():
    layer, x = _layer(), torch.randn(130, 300)
    with torch.inference_mode():
        assert onednn.applies(layer, x) == torch.backends.mkldnn.is_available()
        out = onednn.linear(layer, x)
        ref = torch.addmm(layer.bias, x, layer.weight.t())
    assert out.shape == (130, 70) and out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_it_steps_aside_for_autograd_autocast_and_other_layers():
    layer, x = _layer(), torch.randn(8, 300)
    assert not onednn.applies(layer, x)                      # grad enabled: training
    assert onednn.linear(layer, x).requires_grad
    with torch.inference_mode():
        assert not onednn.applies(layer, x.double())
        assert not onednn.applies(nn.Sequential(layer), x)
        assert not onednn.applies(layer, x[:0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not onednn.applies(layer, x)
            assert onednn.linear(layer, x).dtype == torch.bfloat16


def test_a_wrong_input_width_gets_pytorchs_shape_error():
    """oneDNN's own message for it names no shapes ("could not create a primitive
    descriptor"): the layer's call gives PyTorch's."""
    layer = _layer()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        onednn.linear(layer, torch.randn(4, 299))


def test_changed_weights_are_packed_again():
    layer, x = _layer(), torch.randn(16, 300)
    with torch.inference_mode():
        before = onednn.linear(layer, x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        layer.bias.add_(1.0)
    with torch.inference_mode():
        after = onednn.linear(layer, x)
        ref = torch.addmm(layer.bias, x, layer.weight.t())
    assert not torch.allclose(before, after)
    assert torch.allclose(after, ref, rtol=1e-5, atol=1e-5)


def test_fc_head_in_inference_matches_its_training_path():
    torch.manual_seed(1)
    head, x = FCHead(300, 64).eval(), torch.randn(50, 300)
    with torch.inference_mode(), onednn.off():
        ref = head(x)
    with torch.inference_mode():
        out = head(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    if torch.backends.mkldnn.is_available():            # the head really took oneDNN's route
        assert head.fc6 in onednn._PACKED and head.fc7 in onednn._PACKED
