"""Training stages stopped part-way go on from their last checkpoint and end with exactly the
weights of a run that was never stopped."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import detection.train as train
from detection.backbones import build_net
from detection.train import TrainSettings, finetune, pretrain_trunk

SETTINGS = TrainSettings(seed=3, pretrain_epochs=3, pretrain_jitters=2, pretrain_background=4,
                         pretrain_batch=8, finetune_iters=6, finetune_batch=16,
                         finetune_images=2, pretrain_precision="fp32")


def _net():
    return build_net("zf5_small", None, crop_size=64, seed=0)


def _stop_after_first_save(monkeypatch):
    """Make the first checkpoint written also stop the run, as a killed process would."""
    real = train.save_progress

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        monkeypatch.setattr(train, "save_progress", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_progress", save_then_stop)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("redraw", [0, 1, 2])
def test_pretraining_resumes_from_its_last_epoch(images, tmp_path, monkeypatch, redraw):
    """Also when every epoch draws new regions: the resumed epoch draws the same ones."""
    device = torch.device("cpu")
    settings = replace(SETTINGS, pretrain_redraw=redraw)
    whole = _net()
    pretrain_trunk(whole, images, 1, settings, device, quiet=True)

    progress = tmp_path / "trunk.progress.pt"
    _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain_trunk(_net(), images, 1, settings, device, quiet=True, progress=progress)
    assert progress.is_file()
    resumed = _net()
    log = pretrain_trunk(resumed, images, 1, settings, device, quiet=True, progress=progress)
    assert _same_weights(resumed, whole)
    assert not progress.exists() and log["steps"] > 0


def test_redrawn_regions_are_new_regions(images, monkeypatch):
    """With `pretrain_redraw` N every N-th epoch draws new jittered and background regions;
    with 0 the first draw serves the whole stage."""
    drawn = []
    real = train.pretrain_crops

    def recording(*args, **kwargs):
        crops = real(*args, **kwargs)
        drawn.append(crops.boxes.clone())
        return crops

    monkeypatch.setattr(train, "pretrain_crops", recording)
    for redraw, draws in ((0, 1), (2, 3), (1, 5)):       # 5 epochs: 0 | 0, 2, 4 | each
        drawn.clear()
        pretrain_trunk(_net(), images, 1, replace(SETTINGS, pretrain_epochs=5,
                                                  pretrain_redraw=redraw),
                       torch.device("cpu"), quiet=True)
        assert len(drawn) == draws
    assert not any(len(a) == len(b) and torch.equal(a, b) for a, b in zip(drawn, drawn[1:]))


def test_the_step_budget_is_filled_with_whole_epochs():
    run = train.pretrain_epochs_run
    assert run(None, 10800, 72) == 150                                # exactly the budget
    assert run(None, 10800, 70) == 150                                # 10500: kept, not 154
    assert run(None, 10800, 119) == 90                                # dense: 10710 steps
    assert run(None, 10800, 56) == 192                                # sparse: 10752 steps
    assert run(None, 10800, 69) == 156                                # 10350: 300+ under
    assert run(None, 5, 10) == 1
    assert run(12, 10800, 119) == 12 and run(12, 10, 119) == 12       # asked for: exactly


def test_budgeted_pretraining_is_the_run_of_the_epochs_it_fills(images, capsys):
    """By default pre-training makes the whole epochs that fill its step budget, says so, and
    ends as a run asked for that many epochs would."""
    device = torch.device("cpu")
    two = _net()
    log = pretrain_trunk(two, images, 1, replace(SETTINGS, pretrain_epochs=2), device,
                         quiet=True)
    assert log["epochs"] == 2 and "budget" not in capsys.readouterr().err
    per_epoch = log["steps"] // 2
    budgeted = _net()
    budget_log = pretrain_trunk(budgeted, images, 1,
                                replace(SETTINGS, pretrain_epochs=None,
                                        pretrain_steps=2 * per_epoch), device, quiet=True)
    assert _same_weights(budgeted, two)
    assert (budget_log["epochs"], budget_log["steps"]) == (2, log["steps"])
    err = capsys.readouterr().err
    assert f"2 epochs of {per_epoch} steps" in err and "--pretrain-steps" in err


def test_the_time_cap_keeps_the_epochs_that_fit_but_at_least_half_the_budget():
    fit = train.epochs_in_minutes
    assert fit(2, 128, 30.0, 9.0, 20) == 128               # 2 + 130 fit: the whole budget
    assert fit(2, 128, 30.0, 12.0, 20) == 99               # 2 + (1200 - 30) // 12
    assert fit(2, 128, 30.0, 30.0, 20) == 64               # 41 fit: half the budget
    assert fit(2, 3, 30.0, 1e4, 20) == 2                   # never below the epochs done
    assert fit(2, 128, 30.0, 1e4, 0) == 128                # 0: no cap


class _StepClock:
    """`time` as `detection.train` sees it, advanced by `seconds` at every pre-training step
    (each step sets its learning rate first) and by `warm_up` more at the first; records each
    step's `(step, total)`."""

    def __init__(self, monkeypatch, seconds: float, warm_up: float = 0.0) -> None:
        self.now, self.seconds, self.warm_up, self.steps = 0.0, seconds, warm_up, []
        real_lr = train._cosine_lr

        def tick(optimizer, base, step, total):
            self.now += self.seconds + (self.warm_up if not self.steps else 0.0)
            self.steps.append((step, total))
            real_lr(optimizer, base, step, total)

        monkeypatch.setattr(train, "_cosine_lr", tick)
        monkeypatch.setattr(train, "time", self)

    def perf_counter(self) -> float:
        return self.now


def _budget_of_8_epochs(images, minutes: float):
    """Settings whose step budget is 8 epochs on `images`, capped at `minutes`, and the steps of
    an epoch."""
    budget = replace(SETTINGS, pretrain_epochs=None, pretrain_redraw=1, pretrain_minutes=minutes)
    per_epoch = pretrain_trunk(_net(), images, 1, replace(budget, pretrain_epochs=1),
                               torch.device("cpu"), quiet=True)["steps"]
    return replace(budget, pretrain_steps=8 * per_epoch), per_epoch


def test_pretraining_too_slow_for_its_minutes_ends_at_the_epochs_that_fit(images, capsys,
                                                                          monkeypatch):
    """Judged on the second and third epochs (a slow start counts in the time spent, not in
    the time an epoch takes), said and logged; the learning rate's schedule ends at the new
    last step. Without a cap, the whole budget."""
    device = torch.device("cpu")
    budget, per_epoch = _budget_of_8_epochs(images, 1.0)
    # 10.9 s an epoch and 5 s of warming up: 3 epochs in 37.7 s, and 2 more fit in the minute
    # (judged with the first epoch, 13.4 s an epoch: 1 more)
    clock = _StepClock(monkeypatch, 60 / (5.5 * per_epoch), warm_up=5.0)
    log = pretrain_trunk(_net(), images, 1, budget, device, quiet=True)
    assert (log["epochs"], log["budget_epochs"]) == (5, 8)
    assert log["steps"] == 5 * per_epoch == len(clock.steps)
    assert clock.steps[-1] == (log["steps"] - 1, log["steps"])
    assert clock.steps[3 * per_epoch] == (3 * per_epoch, log["steps"])
    assert "10.9 s an epoch here, so 5 of the budget's 8 epochs fit in 1 minutes" in \
        capsys.readouterr().err
    uncapped = pretrain_trunk(_net(), images, 1, replace(budget, pretrain_minutes=0.0), device,
                              quiet=True)
    assert uncapped["epochs"] == 8 and "budget_epochs" not in uncapped


def test_a_resumed_pretraining_keeps_the_caps_verdict(images, tmp_path, monkeypatch):
    device = torch.device("cpu")
    budget, per_epoch = _budget_of_8_epochs(images, 1.0)
    _StepClock(monkeypatch, 60 / (5.5 * per_epoch))
    whole = _net()
    assert pretrain_trunk(whole, images, 1, budget, device, quiet=True)["epochs"] == 5
    progress = tmp_path / "trunk.progress.pt"
    saves, real = [], train.save_progress

    def save_then_stop_at_the_third(*args, **kwargs):
        real(*args, **kwargs)
        saves.append(args[2])
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_progress", save_then_stop_at_the_third)
    _StepClock(monkeypatch, 60 / (5.5 * per_epoch))
    with pytest.raises(KeyboardInterrupt):
        pretrain_trunk(_net(), images, 1, budget, device, quiet=True, progress=progress)
    assert saves == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    monkeypatch.setattr(train, "save_progress", real)
    _StepClock(monkeypatch, 1e-6)                 # a fast CPU now: the verdict stands
    resumed = _net()
    log = pretrain_trunk(resumed, images, 1, budget, device, quiet=True, progress=progress)
    assert log["epochs"] == 5 and _same_weights(resumed, whole)


def test_a_draw_for_one_epoch_cuts_one_crop_per_region_seen(images, monkeypatch):
    """New regions every epoch: each region seen gets the one crop its step reads (the warp or
    the context crop), not both; a single draw for the stage ends with both for most."""
    drawn = []
    real = train.pretrain_crops

    def recording(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(train, "pretrain_crops", recording)
    pretrain_trunk(_net(), images, 1, replace(SETTINGS, pretrain_redraw=1),
                   torch.device("cpu"), quiet=True)
    for crops in drawn:
        per_epoch = len(crops) // SETTINGS.pretrain_batch * SETTINGS.pretrain_batch
        assert crops._ready.sum() == per_epoch and crops._ready.sum(0).max() == 1
    drawn.clear()
    pretrain_trunk(_net(), images, 1, replace(SETTINGS, pretrain_redraw=0, pretrain_epochs=6),
                   torch.device("cpu"), quiet=True)
    assert len(drawn) == 1 and (drawn[0]._ready.sum(0) == 2).sum() > len(drawn[0]) // 2


def test_photometric_jitter_changes_each_crop_by_its_own_draw():
    x = torch.randn(6, 3, 20, 20) * 50
    x -= x.mean((2, 3), keepdim=True)       # zero channel means: the gains keep them zero
    assert torch.allclose(train.photometric_jitter(x, 0.0, np.random.default_rng(0)), x,
                          atol=1e-3)
    a = train.photometric_jitter(x, 0.6, np.random.default_rng(0))
    b = train.photometric_jitter(x, 0.6, np.random.default_rng(0))
    assert torch.equal(a, b) and a.shape == x.shape
    change = (a - x).abs().mean((1, 2, 3))
    assert (change > 0.5).all() and len(set(change.tolist())) == len(x)
    # each channel shifted by at most 0.6 pixel spreads
    shift = (a - x).mean((2, 3)).abs()
    assert (shift <= 0.6 * x.std() + 1e-3).all() and (shift > 0).all()


def test_photometric_jitter_keeps_hue_to_its_own_share_of_the_shift():
    x = torch.randn(6, 3, 20, 20) * 50
    x -= x.mean((2, 3), keepdim=True)       # zero channel means: the gains keep them zero
    spread = x.std()
    old = train.photometric_jitter(x, 0.6, np.random.default_rng(0))
    # None, or a share as large as the shift, is each channel on its own: the earlier jitter
    for hue in (None, 0.6, 0.9):
        assert torch.equal(train.photometric_jitter(x, 0.6, np.random.default_rng(0), hue), old)
    for hue in (0.0, 0.15):
        a = train.photometric_jitter(x, 0.6, np.random.default_rng(0), hue)
        shift = (a - x).mean((2, 3))
        own = shift - shift.mean(1, keepdim=True)
        assert (shift.abs() <= 0.6 * spread + 1e-3).all()
        assert (own.abs() <= 2 * hue * spread + 1e-3).all()
        assert hue or torch.allclose(own, torch.zeros_like(own), atol=1e-3)
    # the common part turns no hue but moves brightness
    assert (train.photometric_jitter(x, 0.6, np.random.default_rng(0), 0.0) - x).mean(
        (1, 2, 3)).abs().max() > 0.05 * spread


def test_a_progress_file_of_other_settings_is_not_resumed(images, tmp_path, monkeypatch):
    device = torch.device("cpu")
    progress = tmp_path / "trunk.progress.pt"
    _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain_trunk(_net(), images, 1, SETTINGS, device, quiet=True, progress=progress)
    other = TrainSettings(**{**SETTINGS.__dict__, "pretrain_lr": 1e-3})
    fresh, resumed = _net(), _net()
    pretrain_trunk(fresh, images, 1, other, device, quiet=True)
    pretrain_trunk(resumed, images, 1, other, device, quiet=True, progress=progress)
    assert _same_weights(resumed, fresh)


@pytest.mark.parametrize("method", ["spp", "rcnn"])
def test_finetuning_resumes_from_its_last_checkpoint(images, tmp_path, monkeypatch, method):
    device = torch.device("cpu")
    args = (method, images, 1, SETTINGS, device, (96, 128), 400)
    whole = _net()
    fc8_whole, _ = finetune(whole, *args, conv_cache=tmp_path / "c1", quiet=True)

    progress = tmp_path / "ft.progress.pt"
    _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        finetune(_net(), *args, conv_cache=tmp_path / "c2", quiet=True, progress=progress,
                 save_every=2)
    assert progress.is_file()
    resumed = _net()
    fc8_resumed, log = finetune(resumed, *args, conv_cache=tmp_path / "c2", quiet=True,
                                progress=progress, save_every=2)
    assert _same_weights(fc8_resumed, fc8_whole) and _same_weights(resumed, whole)
    assert not progress.exists() and log["iterations"] == SETTINGS.finetune_iters


def test_spp_finetuning_resumes_under_another_memory_budget(images, tmp_path, monkeypatch):
    """A run stopped with its conv5 maps in memory goes on with them read from disk."""
    device = torch.device("cpu")
    args = ("spp", images, 1)
    whole = _net()
    fc8_whole, _ = finetune(whole, *args, SETTINGS, device, (96, 128), 400,
                            conv_cache=tmp_path / "c", quiet=True)
    progress = tmp_path / "ft.progress.pt"
    _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        finetune(_net(), *args, SETTINGS, device, (96, 128), 400, conv_cache=tmp_path / "c",
                 quiet=True, progress=progress, save_every=2)
    steps, real_load = [], train.load_progress

    def recording_load(*a):
        out = real_load(*a)
        steps.append(out[0])
        return out

    monkeypatch.setattr(train, "load_progress", recording_load)
    resumed = _net()
    fc8_resumed, _ = finetune(resumed, *args, replace(SETTINGS, conv5_memory=0.0), device,
                              (96, 128), 400, conv_cache=tmp_path / "c", quiet=True,
                              progress=progress, save_every=2)
    assert steps == [2]                 # went on from the checkpoint, not from the start
    assert _same_weights(fc8_resumed, fc8_whole) and _same_weights(resumed, whole)


def test_a_damaged_progress_file_starts_the_stage_again(images, tmp_path):
    device = torch.device("cpu")
    progress = tmp_path / "trunk.progress.pt"
    progress.write_bytes(b"not a checkpoint")
    fresh, started = _net(), _net()
    pretrain_trunk(fresh, images, 1, SETTINGS, device, quiet=True)
    pretrain_trunk(started, images, 1, SETTINGS, device, quiet=True, progress=progress)
    assert _same_weights(started, fresh) and not progress.exists()


def test_spp_finetuning_pools_each_window_at_the_scale_the_test_assigns(images, tmp_path,
                                                                       monkeypatch):
    """The paper's multi-scale rule holds in training as at test: every image's maps of all
    scales are offered, and the box target is the test's, jittered by at most sqrt(2)."""
    from detection.scales import box_target_side

    calls = []
    real = train.box_windows

    def recording(net, conv, boxes, box_target=224.0):
        calls.append((len(conv.maps), box_target))
        return real(net, conv, boxes, box_target)

    monkeypatch.setattr(train, "box_windows", recording)
    net = _net()
    scales = (64, 96, 128)
    finetune(net, "spp", images, 1, SETTINGS, torch.device("cpu"), scales, 400,
             conv_cache=tmp_path / "c", quiet=True)
    target = box_target_side(net.crop_size)
    assert len(calls) == SETTINGS.finetune_iters * SETTINGS.finetune_images
    assert all(n == len(scales) for n, _ in calls)
    jitters = [t / target for _, t in calls]
    assert all(2 ** -0.5 <= j <= 2 ** 0.5 for j in jitters) and len(set(jitters)) > 1


@pytest.mark.parametrize("mirror", [True, False])
def test_spp_finetuning_draws_images_flipped_half_the_time(images, tmp_path, monkeypatch,
                                                           mirror):
    """With `spp_mirror` a drawn image is flipped about half the time: its windows are pooled
    from the flipped image's maps, at the boxes mirrored with it; without it never."""
    from detection.boxes import mirror_boxes

    net = _net()
    scales = (64, 96)
    maps, mirrored = (train.cached_conv5(net, images, scales, 400, tmp_path, quiet=True,
                                         mirrored=flip) for flip in (False, True))
    owner = {id(m[0]): (i, False) for i, m in enumerate(maps)}
    owner.update({id(m[0]): (i, True) for i, m in enumerate(mirrored)})
    calls = []
    real = train.box_windows

    def recording(net, conv, boxes, box_target=224.0):
        calls.append((*owner[id(conv.maps[0])], boxes.clone()))
        return real(net, conv, boxes, box_target)

    monkeypatch.setattr(train, "box_windows", recording)
    finetune(net, "spp", images, 1, replace(SETTINGS, finetune_iters=20, spp_mirror=mirror),
             torch.device("cpu"), scales, 400, quiet=True, maps=maps, mirrored_maps=mirrored)
    flipped = [flip for _, flip, _ in calls]
    assert len(calls) == 40 and (10 <= sum(flipped) <= 30 if mirror else not any(flipped))
    for i, flip, boxes in calls:
        width = images[i].pixels.shape[1]
        own = mirror_boxes(boxes, width) if flip else boxes      # back to the image's boxes
        gap = (own[:, None] - images[i].regions.boxes[None]).abs().amax(-1)
        assert (gap.amin(1) < 1e-3).all()


def test_spp_finetuning_without_maps_or_a_cache_folder_says_what_it_needs(images, tmp_path):
    """Maps given without their mirror images (and no cache folder to compute them in) is a
    clear error; with flips off the maps alone are enough."""
    net = _net()
    maps = train.cached_conv5(net, images, (64,), 400, tmp_path, quiet=True)
    with pytest.raises(ValueError, match="mirrored_maps"):
        finetune(net, "spp", images, 1, replace(SETTINGS, spp_mirror=True),
                 torch.device("cpu"), (64,), 400, quiet=True, maps=maps)
    fc8, log = finetune(net, "spp", images, 1, replace(SETTINGS, spp_mirror=False),
                        torch.device("cpu"), (64,), 400, quiet=True, maps=maps)
    assert log["iterations"] == SETTINGS.finetune_iters


@pytest.mark.parametrize("freeze", [False, True])
def test_rcnn_freeze_conv_trains_the_fc_layers_only(images, freeze):
    """The R-CNN ablation `rcnn_freeze_conv` leaves the trunk (weights and BatchNorm statistics)
    exactly as pre-trained and fine-tunes fc6/fc7; the default fine-tunes the trunk too."""
    net = _net()
    trunk_before = {k: v.clone() for k, v in net.trunk.state_dict().items()}
    fc_before = {k: v.clone() for k, v in net.rcnn_fc.state_dict().items()}
    finetune(net, "rcnn", images, 1, replace(SETTINGS, rcnn_freeze_conv=freeze),
             torch.device("cpu"), quiet=True)
    trunk_after = net.trunk.state_dict()
    assert all(torch.equal(trunk_before[k], trunk_after[k]) for k in trunk_before) == freeze
    assert not all(torch.equal(fc_before[k], v) for k, v in net.rcnn_fc.state_dict().items())


def test_spp_finetune_conv_trains_the_trunk_and_keeps_batchnorm_statistics(images, tmp_path):
    """`spp_finetune_conv` (beyond the paper) fine-tunes the conv layers with fc6-fc8, each
    image run through the trunk alone (so BatchNorm's statistics stay the pre-trained ones),
    without conv5 maps or a cache; by default the trunk is left as it is."""
    for tuned in (False, True):
        net = _net()
        before = {k: v.clone() for k, v in net.trunk.state_dict().items()}
        maps = None if tuned else train.cached_conv5(net, images, (64, 96), 400, tmp_path,
                                                     quiet=True)
        net.train()                 # as a caller might leave it
        finetune(net, "spp", images, 1, replace(SETTINGS, spp_finetune_conv=tuned,
                                                spp_mirror=False),
                 torch.device("cpu"), (64, 96), 400, quiet=True, maps=maps)
        after = net.trunk.state_dict()
        statistics = [k for k in before if "running" in k or "num_batches" in k]
        weights = [k for k in before if k not in statistics]
        assert statistics and all(torch.equal(before[k], after[k]) for k in statistics)
        assert any(not torch.equal(before[k], after[k]) for k in weights) == tuned


def test_spp_finetune_conv_resumes_from_its_last_checkpoint(images, tmp_path, monkeypatch):
    """The trunk is in the checkpoint: a stopped run ends with the weights of one never
    stopped."""
    settings = replace(SETTINGS, spp_finetune_conv=True)
    args = ("spp", images, 1, settings, torch.device("cpu"), (64, 96), 400)
    whole = _net()
    fc8_whole, _ = finetune(whole, *args, quiet=True)
    progress = tmp_path / "ft.progress.pt"
    _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        finetune(_net(), *args, quiet=True, progress=progress, save_every=2)
    resumed = _net()
    fc8_resumed, _ = finetune(resumed, *args, quiet=True, progress=progress, save_every=2)
    assert _same_weights(fc8_resumed, fc8_whole) and _same_weights(resumed, whole)


@pytest.mark.parametrize("method", ["rcnn", "spp"])
def test_finetuning_draws_background_from_the_set_iou_range(images, tmp_path, monkeypatch,
                                                           method):
    """`finetune_bg_min`: background windows with best IoU in [0.1, 0.5) by default (SPP-net's
    and Fast R-CNN's rule), down to 0 (R-CNN's paper) when set so."""
    drawn = []
    real = train.sample_rows

    def recording(regions, *args, **kwargs):
        rows = real(regions, *args, **kwargs)
        drawn.extend(regions.best_iou[rows][regions.label[rows] == 0].tolist())
        return rows

    monkeypatch.setattr(train, "sample_rows", recording)
    net = _net()
    for bg_min in (0.1, 0.0):
        drawn.clear()
        finetune(net, method, images, 1, replace(SETTINGS, finetune_bg_min=bg_min,
                                                 finetune_iters=20, spp_mirror=False),
                 torch.device("cpu"), (64,), 400, conv_cache=tmp_path / "c", quiet=True)
        assert drawn and max(drawn) < 0.5
        assert (min(drawn) >= 0.1) == (bg_min == 0.1)


def test_pretraining_on_crops_cut_per_step_ends_with_the_same_weights(images):
    """With a memory budget too small for the crops (VOC with the `paper` preset), each
    minibatch is cut from the images when drawn: the training itself is unchanged."""
    held, streamed = _net(), _net()
    pretrain_trunk(held, images, 1, SETTINGS, torch.device("cpu"), quiet=True)
    pretrain_trunk(streamed, images, 1, replace(SETTINGS, pretrain_crop_memory=0.0),
                   torch.device("cpu"), quiet=True)
    assert _same_weights(held, streamed)


def test_bf16_pretraining_runs_the_trunk_in_bf16_and_keeps_fp32_weights(images):
    """`pretrain_precision="bf16"`: the trunk's convolutions compute in bf16 (autocast), the
    weights and what they learn stay fp32, and the trunk is another than fp32's."""
    fp32, bf16 = _net(), _net()
    pretrain_trunk(fp32, images, 1, SETTINGS, torch.device("cpu"), quiet=True)
    seen = set()
    first_conv = next(m for m in bf16.trunk.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    log = pretrain_trunk(bf16, images, 1, replace(SETTINGS, pretrain_precision="bf16"),
                         torch.device("cpu"), quiet=True)
    assert seen == {torch.bfloat16} and np.isfinite(log["final_loss"])
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert not _same_weights(fp32, bf16)
    with pytest.raises(ValueError, match="fp16"):
        pretrain_trunk(_net(), images, 1, replace(SETTINGS, pretrain_precision="fp16"),
                       torch.device("cpu"), quiet=True)


def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch, images):
    """"auto" (the default): bf16 where the CPU has bf16 arithmetic, fp32 on other CPUs and on
    GPUs; pre-training under "auto" runs the trunk in what it resolves to."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert TrainSettings().pretrain_precision == "auto"
    for native in (True, False):
        monkeypatch.setattr(train, "native_cpu_bf16", lambda: native)
        assert train.resolve_pretrain_precision("auto", cpu) == ("bf16" if native else "fp32")
        assert train.resolve_pretrain_precision("auto", gpu) == "fp32"
        for fixed in ("fp32", "bf16"):
            assert train.resolve_pretrain_precision(fixed, cpu) == fixed
        seen = set()
        net = _net()
        first_conv = next(m for m in net.trunk.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
        pretrain_trunk(net, images, 1, replace(SETTINGS, pretrain_epochs=1,
                                                pretrain_precision="auto"), cpu, quiet=True)
        assert seen == {torch.bfloat16 if native else torch.float32}
    with pytest.raises(ValueError, match="fp16"):
        train.resolve_pretrain_precision("fp16", cpu)


def test_native_bf16_is_read_from_torchs_cpu_probe_and_a_missing_or_failing_probe_means_no(
        monkeypatch):
    def failing():
        raise RuntimeError("no cpuinfo")

    for probe, expected in ((lambda: True, True), (lambda: False, False), (failing, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", probe, raising=False)
        assert train.native_cpu_bf16() is expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert train.native_cpu_bf16() is False


def test_spp_region_features_from_the_conv5_cache_match_a_fresh_conv_pass(images, tmp_path):
    """SPP-net's SVM and box-regression features read the fp16 conv5 cache of fine-tuning: the
    same rows, and the numbers of a fresh fp32 conv pass up to fp16 rounding of the maps."""
    from detection.features import ExtractSettings

    net = _net().eval()
    scales = (96, 128, 176)
    maps = train.cached_conv5(net, images, scales, 400, tmp_path / "conv5", quiet=True)
    settings = ExtractSettings(scales=(96, 176), max_side=400, box_target=60.0)
    rows_of = (lambda item: item.regions.best_iou >= 0.3)
    fresh = list(train.region_features(net, "spp", images, settings, True, rows_of))
    cached = list(train.region_features(net, "spp", images, settings, True, rows_of,
                                        (scales, maps)))
    assert len(fresh) == len(cached) == len(images)
    for (rows_a, pooled_a, fc7_a), (rows_b, pooled_b, fc7_b) in zip(fresh, cached):
        assert rows_a.image_id == rows_b.image_id and torch.equal(rows_a.rows, rows_b.rows)
        assert len(rows_a.rows) > 0 and pooled_a.shape == pooled_b.shape
        scale = pooled_a.abs().max()
        assert (pooled_a - pooled_b).abs().max() <= 2e-3 * scale
        assert not torch.equal(pooled_a, pooled_b) or scale == 0   # really read from the cache
        assert torch.allclose(fc7_a, fc7_b, atol=1e-2 * fc7_a.abs().max().item())


def test_photos_larger_than_the_largest_input_are_held_downscaled(tiny_voc):
    """A photo beyond the largest input of any stage is held shrunk to it, with its proposals
    and ground truth scaled along (so they label the same regions) and the factors recorded; a
    smaller one is held as read."""
    from data.voc import open_voc

    dataset = open_voc(tiny_voc, "all")
    proposals = {im.image_id: np.array([[0, 0, 31, 23], [30, 10, 59, 39]], np.float32)
                 for im in dataset}
    full = {im.image_id: im for im in train.load_training_images(dataset, proposals)}
    held = {im.image_id: im for im in train.load_training_images(dataset, proposals,
                                                                 max_input=(24, 2000))}
    assert held["img1"].pixels.shape == (24, 32, 3) and held["img1"].scale == (0.5, 0.5)
    assert held["img3"].pixels.shape == (24, 24, 3) and held["img3"].scale == (0.6, 0.6)
    for image_id, item in held.items():
        sx, sy = item.scale
        widen = torch.tensor([0.0, 0.0, 1.0, 1.0])
        expected = (full[image_id].regions.boxes + widen) * torch.tensor([sx, sy, sx, sy]) - widen
        assert torch.allclose(item.regions.boxes, expected)
        assert torch.equal(item.regions.gt_class, full[image_id].regions.gt_class)
    as_read = train.load_training_images(dataset, proposals, max_input=(48, 64))
    assert all(item.scale == (1.0, 1.0) and item.pixels.shape == full[item.image_id].pixels.shape
               for item in as_read)


def test_images_whose_size_differs_from_their_annotation_are_reported_once(tiny_voc):
    """An image resized after annotating (or whose size is otherwise not the annotation's) has
    boxes in another frame: one line names the first such image and counts the others."""
    import xml.etree.ElementTree as ET

    from data.voc import open_voc

    for image_id in ("img1", "img2"):          # their annotations now claim a swapped size
        path = tiny_voc / "Annotations" / f"{image_id}.xml"
        tree = ET.parse(path)
        size = tree.getroot().find("size")
        width, height = size.find("width").text, size.find("height").text
        size.find("width").text, size.find("height").text = height, width
        tree.write(path)
    dataset = open_voc(tiny_voc, "all")
    proposals = {im.image_id: np.array([[0, 0, 10, 10]], np.float32) for im in dataset}
    messages = []
    loaded = train.load_training_images(dataset, proposals, on_error=messages.append)
    assert len(loaded) == 3 and len(messages) == 1
    assert "img1.jpg" in messages[0] and "48x64 but the image is 64x48" in messages[0]
    assert "(1 more image like it)" in messages[0]
    assert train.load_training_images(open_voc(tiny_voc, "test"), proposals,
                                      on_error=messages.append) and len(messages) == 1


def test_boxes_beyond_their_image_are_clipped_or_left_out_of_training(voc_writer, tmp_path):
    """A box that reaches beyond its image is clipped to it, one wholly outside is left out (not
    a region of zeros labelled as an object); each kind is reported once, naming the first
    annotation file and counting the rest. The border written one pixel out is no error."""
    from data.voc import open_voc

    images = {"a": (64, 48, [("cat", (10, 10, 80, 40), 0, 0), ("dog", (70, 5, 90, 20), 0, 0)]),
              "b": (64, 48, [("cat", (0, 1, 65, 49), 0, 0), ("dog", (2, 2, 20, 20), 0, 0),
                             ("cat", (-9, 5, 30, 30), 0, 0)])}
    root = voc_writer(tmp_path / "beyond", images, {"trainval": ["a", "b"]})
    dataset = open_voc(root, "trainval", ("cat", "dog"))
    proposals = {i: np.array([[0, 0, 10, 10]], np.float32) for i in images}
    messages = []
    loaded = {im.image_id: im for im in train.load_training_images(
        dataset, proposals, on_error=messages.append)}
    gt = {i: item.regions.boxes[item.regions.gt_class > 0].tolist() for i, item in loaded.items()}
    assert gt["a"] == [[9, 9, 63, 39]]                     # the dog right of the image is gone
    assert gt["b"] == [[0, 0, 63, 47], [1, 1, 19, 19], [0, 4, 29, 29]]
    assert len(messages) == 2
    assert "a.xml: an object's box reaches beyond its image: clipped to it for training (1 more" \
        in messages[0]
    assert "a.xml: an object's box lies wholly outside its image: left out of training" \
        in messages[1] and "more" not in messages[1]
