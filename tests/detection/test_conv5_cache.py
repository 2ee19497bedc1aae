"""SPP-net's conv5 cache: entries written once and resumed, damaged ones recomputed, and maps
beyond the memory budget read from disk with the same numbers as maps held in memory."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from detection.backbones import build_net
from detection.conv5_cache import build_conv5_cache, entry_path
from detection.train import TrainSettings, cached_conv5, finetune, region_features
from detection.features import ExtractSettings

SCALES = (96, 160)


def _maps(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 5, 7, generator=g), torch.randn(8, 9, 12, generator=g)]


def test_entries_are_computed_once_and_resumed(tmp_path):
    calls = []

    def compute(i):
        calls.append(i)
        return _maps(i)

    ids = ["a", "b/c", "d é"]
    first = build_conv5_cache(compute, ids, tmp_path, 2, memory_gib=1.0, quiet=True)
    assert calls == [0, 1, 2] and len(first) == 3 and first.held == 3
    assert first[1][0].dtype == torch.float16
    assert torch.equal(first[1][1], _maps(1)[1].half())
    again = build_conv5_cache(compute, ids, tmp_path, 2, memory_gib=1.0, quiet=True)
    assert calls == [0, 1, 2]                      # nothing recomputed
    entry_path(tmp_path, "b/c").write_bytes(b"not a torch file")
    repaired = build_conv5_cache(compute, ids, tmp_path, 2, memory_gib=1.0, quiet=True)
    assert calls == [0, 1, 2, 1]                   # only the damaged entry
    for i in range(3):
        assert all(torch.equal(x, y) for x, y in zip(again[i], repaired[i]))


def test_a_small_budget_streams_the_same_maps_from_disk(tmp_path):
    ids = [f"img{i}" for i in range(5)]
    one = sum(m.numel() * 2 for m in _maps(0))     # fp16 bytes of one image
    held = build_conv5_cache(_maps, ids, tmp_path, 2, memory_gib=10.0, quiet=True)
    some = build_conv5_cache(_maps, ids, tmp_path, 2, memory_gib=2.5 * one / 1024 ** 3,
                             quiet=True)
    none = build_conv5_cache(_maps, ids, tmp_path, 2, memory_gib=0.0, quiet=True)
    assert (held.held, some.held, none.held) == (5, 2, 0)
    for cache in (some, none):
        for i in range(5):
            assert all(torch.equal(x, y) for x, y in zip(held[i], cache[i]))
    view = some.select([4, 0])
    assert len(view) == 2 and view.held == 1
    assert torch.equal(view[0][1], held[4][1]) and torch.equal(view[-1][0], held[0][0])


def test_finetuning_and_region_features_read_streamed_maps_alike(images, tmp_path):
    """A budget of 0 (every map read from disk per step) trains the same SPP-net head."""
    settings = TrainSettings(seed=1, finetune_iters=5, finetune_batch=16, finetune_images=2)
    heads = []
    for memory in (4.0, 0.0):
        net = build_net("zf5_small", None, crop_size=64, seed=0)
        maps, mirrored = (cached_conv5(net, images, SCALES, 400, tmp_path / "conv5",
                                       quiet=True, memory_gib=memory, mirrored=flip)
                          for flip in (False, True))
        assert maps.held == mirrored.held == (len(images) if memory else 0)
        fc8, _ = finetune(net, "spp", images, 1, replace(settings, conv5_memory=memory),
                          torch.device("cpu"), SCALES, 400, quiet=True, maps=maps,
                          mirrored_maps=mirrored)
        extract = ExtractSettings(scales=SCALES, max_side=400, box_target=60.0)
        fc7 = [f for _, _, f in region_features(net.eval(), "spp", images, extract, True,
                                                cached=(SCALES, maps))]
        heads.append((net.spp_fc.state_dict(), fc8.state_dict(), fc7))
    (fc_a, fc8_a, fc7_a), (fc_b, fc8_b, fc7_b) = heads
    assert all(torch.equal(fc_a[k], fc_b[k]) for k in fc_a)
    assert all(torch.equal(fc8_a[k], fc8_b[k]) for k in fc8_a)
    assert all(torch.equal(a, b) for a, b in zip(fc7_a, fc7_b))


def test_mirrored_maps_are_the_flipped_images_own_entries(images, tmp_path):
    """`mirrored=True` stores the conv5 maps of each image flipped left to right (not the
    flipped maps of the image) beside the image's own entries."""
    from detection.features import conv_maps

    net = build_net("zf5_small", None, crop_size=64, seed=0).eval()
    plain = cached_conv5(net, images, SCALES, 400, tmp_path, quiet=True)
    mirrored = cached_conv5(net, images, SCALES, 400, tmp_path, quiet=True, mirrored=True)
    assert len(list(tmp_path.glob("*.pt"))) == 2 * len(images)
    with torch.inference_mode():
        fresh = conv_maps(net, images[0].pixels[:, ::-1], SCALES, 400).maps
    for a, b, c in zip(mirrored[0], fresh, plain[0]):
        assert a.shape == c.shape and torch.allclose(a.float(), b, atol=2e-3 * b.abs().max())
        assert not torch.allclose(a.float(), c.float().flip(-1), atol=2e-3 * b.abs().max())


def test_an_image_read_in_another_frame_gets_its_own_maps(images, tmp_path):
    """The same image id with its pixels turned by 90 degrees (an EXIF-turned photo now read as
    stored) is computed anew, never served the other frame's maps."""
    net = build_net("zf5_small", None, crop_size=64, seed=0).eval()
    first = cached_conv5(net, images[:1], SCALES, 400, tmp_path, quiet=True)
    turned = [replace(images[0], pixels=np.ascontiguousarray(np.rot90(images[0].pixels)))]
    second = cached_conv5(net, turned, SCALES, 400, tmp_path, quiet=True)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    for a, b in zip(first[0], second[0]):
        assert a.shape[-2:] == b.shape[-2:][::-1]


def test_an_entry_lost_during_training_is_a_one_line_error(tmp_path):
    from data.errors import SppnetError

    cache = build_conv5_cache(_maps, ["a", "b"], tmp_path, 2, memory_gib=0.0, quiet=True)
    entry_path(tmp_path, "b").unlink()
    with pytest.raises(SppnetError, match=str(entry_path(tmp_path, "b").name)):
        cache[1]
