"""Training of both detectors from scratch (no ImageNet here), in the papers' stages:

1. `pretrain_trunk`: the shared conv trunk learns to classify crops of the training split
   (objects with jitter, and background) at several sizes through an SPP head: SPP-net's
   multi-size training, standing in for ImageNet pre-training. On crops of the R-CNN warp size
   the R-CNN head (pool5 -> fc6 -> fc7) is trained on the same crops, so that both methods start
   from one trunk and from fc layers pre-trained on the same data (fair: neither gets more).
   The regions are drawn anew every epoch and the crops' colours jittered (augmentation).
2. `finetune`: R-CNN fine-tunes all layers on warped windows; SPP-net fine-tunes fc6, fc7 and
   fc8 on windows pooled from conv5 maps cached on disk (fp16), conv frozen, each window at
   the scale where the test pools it. Minibatches of 128 windows, 25% foreground
   (IoU >= 0.5), background IoU in [0.1, 0.5).
3. `train_svms`: per-class linear SVMs with hard negative mining on fc7 (svm/), streamed per image.
4. `train_box_regressors`: ridge regression on the pooled conv features.

Every stage is seeded; the models of finished stages are checkpoints in the model folder, so a
stopped `train` resumes at the first unfinished stage.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from data.atomic import atomic_write
from detection.backbones import DetectorNet, output_side
from detection.boxes import mirror_boxes
from detection.conv5_cache import Conv5Cache, build_conv5_cache
from detection.features import (ConvMaps, ExtractSettings, box_windows, conv_maps,
                                conv_maps_for_boxes, extract, spp_from_maps)
from detection.memory import release_now_and_then
from detection.pretrain_crops import PretrainCrops, context_margin, pretrain_crops
from detection.rcnn_warp import warp_images
from detection.scales import box_target_side, fit_input, scale_factor
from detection.spp import project_boxes, spp_pool_batch, spp_pool_maps
from detection.regions import FG_IOU, LabelledRegions, label_regions, sample_rows


@dataclass(frozen=True)
class TrainSettings:
    """Schedule and sizes of the training stages."""

    seed: int = 0
    # pre-training length: exactly `pretrain_epochs` epochs when set; by default (None) the
    # whole epochs that fill a budget of `pretrain_steps` (`pretrain_epochs_run`). An epoch holds
    # every object 7 times and 12 background regions per image, so its steps grow with the
    # objects per image: a dense split makes fewer epochs instead of taking longer, a sparse one
    # more. Longer was better: on three real-photo-sized sets, trunks pre-trained (with the
    # augmentation below) on 3/4 of trainval scored the other 1/4 at SPP-net 0.801 and R-CNN
    # 0.822 mAP on average with 96 epochs (two pre-training seeds), against 0.779 and 0.807 with
    # 64 and 0.748 and 0.790 with 48 (MEASUREMENTS.md, "Pre-training length"), and half as many
    # steps again as the earlier budget of 7200 (150 epochs instead of 96) lifted SPP-net from
    # 0.775 to 0.810 and R-CNN from 0.789 to 0.807 on a real-photo-sized stand-in ("A larger
    # step budget"). Hosts too slow for it are held to the time cap below; `sppnet demo` asks
    # for 16 epochs, for its time
    pretrain_epochs: int | None = None
    pretrain_steps: int = 10800
    # ... or as many of the budget's epochs as fit in this many minutes, judged by the second
    # and third epochs (`epochs_in_minutes`; 0: no cap; never with `pretrain_epochs`). The
    # earlier budget of 7200 steps took 8-11 minutes on the fastest 2-core host measured and 13
    # on the slowest with bf16, and would take 24 in fp32 on an AVX2-only one, where SPP-net's
    # train + eval would come to 30.5: over the real-photo check's 30 (MEASUREMENTS.md,
    # "Pre-training's time cap")
    pretrain_minutes: float = 20.0
    pretrain_jitters: int = 6          # jittered crops per object
    pretrain_background: int = 12      # background crops per image
    pretrain_batch: int = 64
    pretrain_context: float = 1 / 3    # SPP head's crops: real context per side, x box side
    pretrain_crop_memory: float = 2.0  # GiB: crops held in memory up to this, else cut per step
    conv5_memory: float = 4.0          # GiB: SPP-net's conv5 maps held in memory up to this,
                                       # the others read from the disk cache when drawn
    pretrain_lr: float = 2e-3
    # augmentation: new jittered and background regions every `pretrain_redraw` epochs (0: one
    # draw for the stage) and `photometric_jitter` of strength `pretrain_color` (0: none). On
    # validation no trunk saw (two real-photo-sized sets, README "Pre-training augmentation"):
    # SPP-net 0.584 / 0.565 and R-CNN 0.667 / 0.642 mAP without either, 0.729 / 0.792 and
    # 0.745 / 0.792 with 0.6 and new regions in every epoch from the 9th (a bug of that run's
    # schedule; on the CPU's test splits, every epoch: SPP-net 0.782 / 0.849, R-CNN 0.851 / 0.841)
    pretrain_redraw: int = 1
    pretrain_color: float = 0.6
    # of the jitter's channel shift, at most this much is each channel's own, which turns hues;
    # the rest is common to the three channels (brightness). None: all of it is each channel's
    # own, which turns the hue of a saturated pixel of a photo by a median 16 degrees (0.15: 5).
    # For classes told apart by their colour: on a stand-in whose classes differ by hue alone,
    # 0.15 lifted SPP-net from 0.710 to 0.817 mAP; on those of random colours it cost SPP-net
    # 0.014 and R-CNN 0.026 on validation (README, "Hue in the colour jitter")
    pretrain_hue: float | None = None
    # number format of the trunk's forward pass in pre-training: "bf16" runs it under autocast
    # (weights, optimiser and heads stay fp32), "auto" (`resolve_pretrain_precision`) bf16 on a
    # CPU that computes it natively (AVX512-BF16, AMX), fp32 elsewhere. bf16 took 29% and 33%
    # off the pre-training on the two 2-core hosts measured, which brings SPP-net's train + eval
    # on the slower one from 33 to 23 minutes, within the real-photo check's 30; on validation
    # its trunks scored as fp32's for SPP-net and 0.013 below for R-CNN (README, "Pre-training
    # in bf16")
    pretrain_precision: str = "auto"
    # the SPP head's context crops keep each box's shape (`aspect_context_squares`), as
    # SPP-net's test sees an object inside its image, instead of squashing it to a square as
    # R-CNN's warps do; the steps at the warp size still read the warps. Off: on two composite
    # sets, two trunks each, it moved SPP-net by +0.011 and R-CNN by +0.006 mAP in the mean,
    # within one trunk's spread (README, "Boxes of their own shape in pre-training")
    pretrain_aspect: bool = False
    finetune_iters: int | None = None  # None: 1500 for SPP-net (fc only, cheap), 400 for R-CNN
    scale_choice_fraction: float = 0.2  # SPP-net's fit that ranks test scales: this x iters
    finetune_batch: int = 128
    finetune_images: int = 4           # images per minibatch
    fg_fraction: float = 0.25
    # background windows of fine-tuning: best IoU with the ground truth in [this, 0.5). 0.1 is
    # SPP-net's (and Fast R-CNN's) rule, 0 R-CNN's; on validation no trunk saw (three
    # real-photo-sized sets) 0 scored SPP-net 0.019 and R-CNN 0.005 lower in the mean, so both
    # methods use 0.1 (README, "Background windows in fine-tuning")
    finetune_bg_min: float = 0.1
    finetune_lr: float = 1e-3
    weight_decay: float = 1e-4
    # SPP-net fine-tuning draws each image flipped left to right half the time, pooling from
    # the conv5 maps of the flipped image (a second conv5 cache), as R-CNN flips its windows
    spp_mirror: bool = True
    # beyond the paper (Fast R-CNN's later recipe): SPP-net fine-tunes the conv layers too, each
    # image run through the trunk with gradients at the scales its windows are pooled at
    spp_finetune_conv: bool = False
    rcnn_freeze_conv: bool = False     # ablation: R-CNN fine-tunes fc6-fc8 only, as SPP-net does


@dataclass
class TrainImage:
    """One training image in memory: pixels, its labelled regions (ground truth first)."""

    image_id: str
    pixels: np.ndarray
    regions: LabelledRegions
    # factors from the image file's pixels to `pixels` (across, down): below 1 for a photo held
    # downscaled (`load_training_images`), whose regions are in the downscaled frame
    scale: tuple[float, float] = (1.0, 1.0)


def _progress(iterable, desc: str, total: int | None = None, quiet: bool = False):
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, disable=quiet,
                dynamic_ncols=True, leave=False)


def _cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int,
               warmup: int = 20) -> None:
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _adamw(params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where torch has one for these tensors: one pass over memory
    instead of a dozen (the `small` SPP head's 3.4 M weights on this project's 2-core CPU: 14.6 ms
    per update with the default kernel, 2.9 ms with the fused one)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):          # older torch: no fused kernel for the CPU
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# the settings that turn the pre-training augmentation off (the demo's schedule, and what the
# versions before it did)
NO_AUGMENTATION = {"pretrain_redraw": 0, "pretrain_color": 0.0}
# what a trunk's recorded recipe means by the settings that came after it was saved
EARLIER_RECIPE = {**NO_AUGMENTATION, "pretrain_precision": "fp32", "pretrain_hue": None,
                  "pretrain_aspect": False, "pretrain_minutes": 0.0}
PRECISIONS = ("fp32", "bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16; every CPU with AMX has it too).
    Without it bf16 is converted in software and can be slower than fp32."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)   # private: may go away
    try:
        return bool(probe and probe())
    except Exception:           # a probe that fails answers "no": fp32 is always right
        return False


def resolve_pretrain_precision(precision: str, device: torch.device) -> str:
    """The number format pre-training runs in: `precision` itself, or for "auto" bf16 on a CPU
    with native bf16 and fp32 elsewhere. A GPU stays fp32: there bf16 saved no time (pre-training
    was bound by the CPU's crop cutting) and its R-CNN scored lower on validation."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"pretrain_precision {precision!r}: not one of "
                         f"{', '.join(PRECISION_CHOICES)}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and native_cpu_bf16() else "fp32"


# where data is held while training, not what is trained: a run may resume under another budget
MEMORY_FIELDS = ("pretrain_crop_memory", "conv5_memory")


def run_key(*parts: object) -> str:
    """A short hash of what a training stage depends on (settings, classes, images): a progress
    file of another run is never resumed. Memory budgets do not count (the same numbers)."""
    parts = tuple({k: v for k, v in asdict(p).items() if k not in MEMORY_FIELDS}
                  if isinstance(p, TrainSettings) else p for p in parts)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Progress(NamedTuple):
    """Where a resumed stage goes on: its step, the losses so far, and what the stage noted
    about itself (`save_progress`'s `notes`)."""

    step: int
    losses: list[float]
    notes: dict


def save_progress(path: Path | None, key: str, step: int, modules: dict[str, nn.Module],
                  optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                  losses: list[float], notes: dict | None = None) -> None:
    """Write where a stage stands (weights, optimizer, both random generators, step, and the
    JSON-able `notes` of the stage) to `path`, atomically, so that a stopped run resumes there
    with the same numbers."""
    if path is None:
        return
    state = {"key": key, "step": step, "notes": json.dumps(notes or {}),
             "modules": {name: m.state_dict() for name, m in modules.items()},
             "optimizer": optimizer.state_dict(),
             "numpy_rng": json.dumps(rng.bit_generator.state),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "losses": torch.tensor(losses)}
    atomic_write(path, lambda f: torch.save(state, f))


def load_progress(path: Path | None, key: str, modules: dict[str, nn.Module],
                  optimizer: torch.optim.Optimizer, rng: np.random.Generator) -> Progress:
    """Restore a stage saved by `save_progress` under the same `key`; returns the step to go on
    from, the losses so far and the stage's notes (0, [] and {} when there is nothing to
    resume)."""
    nothing = Progress(0, [], {})
    if path is None or not path.is_file():
        return nothing
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # damaged (a file is only ever replaced whole, but disks fail): start again
        return nothing
    if not isinstance(state, dict) or state.get("key") != key:
        return nothing
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(int(state["step"]), state["losses"].tolist(),
                    json.loads(state.get("notes", "{}")))


def spp_full_window(net: DetectorNet, conv5: Tensor) -> Tensor:
    """Pyramid pooling of whole conv5 maps `[B, C, h, w]` (the window is the full map): the same
    bins and flattening order as `spp_pool`, batched with `adaptive_max_pool2d`."""
    return torch.cat([F.adaptive_max_pool2d(conv5, n).flatten(1) for n in net.spp_levels], 1)


# ---------------------------------------------------------------------------------------------
# 1. pre-training


def box_window(net: DetectorNet, side: int, margin: float) -> list[int]:
    """The conv5 cell window `[x1, y1, x2, y2]` of the box in the middle of a square crop of
    `side` pixels with `margin` pixels around it, projected as the test projects boxes."""
    cells = output_side(net.trunk, side)
    box = torch.tensor([[margin, margin, side - margin - 1, side - margin - 1]])
    return project_boxes(box, net.stride, net.first_centre, cells, cells)[0].tolist()


def crop_windows(net: DetectorNet, crops: PretrainCrops, idx: Tensor, side: int,
                 flip: bool) -> Tensor:
    """The conv5 cell windows `[B, 4]` of the boxes of context crops `idx` resized to `side`
    pixels (and flipped left to right with `flip`), projected as the test projects boxes."""
    place = crops.places[idx] * (side / crops.context_side)             # pixel edges
    if flip:
        place = torch.stack([side - place[:, 2], place[:, 1], side - place[:, 0], place[:, 3]], 1)
    cells = output_side(net.trunk, side)
    return project_boxes(torch.cat([place[:, :2], place[:, 2:] - 1], 1), net.stride,
                         net.first_centre, cells, cells)


def photometric_jitter(x: Tensor, strength: float, rng: np.random.Generator,
                       hue: float | None = None) -> Tensor:
    """Each crop of `x` `[B, 3, H, W]` with its own saturation and contrast gain in 1 +-
    `strength` and its channels shifted by up to `strength` times the batch's pixel spread (so
    the same for any pixel normalisation): a trunk that sees a few hundred photos should not
    learn their exact colours and lighting. Of the shift, up to `hue` is each channel's own
    (which turns hues) and the rest common to the three (brightness); `hue` None or at least
    `strength` shifts each channel on its own, as the versions before `hue` did."""
    b = len(x)
    draw = (lambda low, high, shape: torch.as_tensor(rng.uniform(low, high, shape),
                                                      dtype=x.dtype, device=x.device))
    own = strength if hue is None else min(hue, strength)
    spread = x.std()
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * draw(1 - strength, 1 + strength, (b, 1, 1, 1))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * draw(1 - strength, 1 + strength, (b, 1, 1, 1)) + mean
    if own < strength:
        x = x + draw(own - strength, strength - own, (b, 1, 1, 1)) * spread
    return x + draw(-own, own, (b, 3, 1, 1)) * spread


#: The budget's epochs on seed 9's real-photo-sized stand-in (72 steps an epoch): kept where
#: they come within `BUDGET_SLACK` steps under the budget (70-72 steps an epoch), so that a split
#: of about its objects per image makes the trunk measured (MEASUREMENTS.md, "A larger step
#: budget")
DEFAULT_PRETRAIN_EPOCHS = 150
BUDGET_SLACK = 300


def pretrain_epochs_run(epochs: int | None, budget: int, steps_per_epoch: int) -> int:
    """The epochs pre-training makes: `epochs` when asked for; else 150 when those take between
    `BUDGET_SLACK` under `budget` steps and `budget`, and otherwise as many whole epochs as fit
    in the budget (at least one)."""
    if epochs is not None:
        return epochs
    if budget - BUDGET_SLACK <= DEFAULT_PRETRAIN_EPOCHS * steps_per_epoch <= budget:
        return DEFAULT_PRETRAIN_EPOCHS
    return max(1, budget // steps_per_epoch)


def epochs_in_minutes(done: int, planned: int, elapsed: float, epoch_seconds: float,
                      minutes: float) -> int:
    """The epochs a pre-training of `planned` epochs makes under a cap of `minutes` (0: none),
    `done` epochs and `elapsed` seconds in, at `epoch_seconds` an epoch: `planned` where they
    fit, else those that fit, but never fewer than half of `planned` (a trunk pre-trained for
    less is a poor trade for the time: half the budget cost SPP-net 0.056 mAP on a composite
    set, README "Real-photo composites")."""
    if not minutes or epoch_seconds <= 0:
        return planned
    fit = done + max(0, int((minutes * 60 - elapsed) // epoch_seconds))
    return min(planned, max(done, (planned + 1) // 2, fit))


def pretrain_trunk(net: DetectorNet, images: Sequence[TrainImage], num_classes: int,
                   settings: TrainSettings, device: torch.device, quiet: bool = False,
                   progress: Path | None = None) -> dict:
    """Stage 1: multi-size crop classification through an SPP head (and the R-CNN head on
    crops of the warp size). Trains the trunk, `spp_fc`, `rcnn_fc`; returns a log dict. On the
    steps at the smaller sizes the SPP head reads crops with real context around the box and
    pools the box's conv5 window, as SPP-net's test pools a box inside the whole image (with
    tight crops alone, the conv5 cells only ever saw zero padding around an object). Without
    `pretrain_epochs` it runs the epochs that fill the step budget, or, where its first epochs
    show that those would take longer than `pretrain_minutes`, the ones that fit (said,
    and logged as `epochs` of `budget_epochs`). With `progress`, a checkpoint is written there
    after every epoch and a stopped run goes on from the last one (the file is removed when the
    stage ends)."""
    began = time.perf_counter()
    settings = replace(settings, pretrain_precision=resolve_pretrain_precision(
        settings.pretrain_precision, device))
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    cut_bar = (lambda it: _progress(it, "pretrain crops", quiet=quiet))
    crops = pretrain_crops(net, images, settings, rng, cut_bar)
    size = net.crop_size
    sizes = [size, int(round(size * 0.65)), size, int(round(size * 0.8))]
    context_inputs = {}          # box side -> (input side, box window in its conv5 map)
    for s in set(sizes) - {size}:
        margin = context_margin(s, settings.pretrain_context)
        context_inputs[s] = (s + 2 * margin, box_window(net, s + 2 * margin, margin))
    heads = nn.ModuleDict({"spp": nn.Linear(net.feature_dim, num_classes + 1),
                           "rcnn": nn.Linear(net.feature_dim, num_classes + 1)}).to(device)
    params = [p for m in (net.trunk, net.spp_fc, net.rcnn_fc, heads) for p in m.parameters()]
    optimizer = _adamw(params, lr=settings.pretrain_lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, len(crops) // settings.pretrain_batch)
    epochs = pretrain_epochs_run(settings.pretrain_epochs, settings.pretrain_steps,
                                 steps_per_epoch)
    minutes = settings.pretrain_minutes if settings.pretrain_epochs is None else 0
    if settings.pretrain_epochs is None:
        cap = f" or {minutes:g} minutes" if minutes else ""
        print(f"pretrain: {epochs} epoch{'s' * (epochs != 1)} of {steps_per_epoch} steps "
              f"({len(crops)} regions each) for the budget of {settings.pretrain_steps} steps"
              f"{cap} (--pretrain-steps N, --pretrain-minutes M; --pretrain-epochs N for N "
              "epochs)", file=sys.stderr)
    budget_epochs = epochs
    modules = {"trunk": net.trunk, "spp_fc": net.spp_fc, "rcnn_fc": net.rcnn_fc, "heads": heads}
    key = run_key("pretrain", settings, num_classes, [im.image_id for im in images], len(crops))
    step, losses, notes = load_progress(progress, key, modules, optimizer, rng)
    epochs = notes.get("epochs", epochs)       # a resumed run keeps the cap's verdict
    spent = notes.get("seconds", 0.0)          # and counts the time of its earlier sessions
    total = steps_per_epoch * epochs
    net.train()
    start = time.perf_counter()
    bar = _progress(range(total), "pretrain", total=total, quiet=quiet)
    bar.update(step)
    first_epoch = epoch = step // steps_per_epoch
    while epoch < epochs:
        block = epoch // settings.pretrain_redraw if settings.pretrain_redraw else 0
        if block and (epoch % settings.pretrain_redraw == 0 or epoch == first_epoch):
            # a block's regions depend on the seed and the block alone, so a resumed run
            # draws the same ones; the old crops go first (two sets at once: +1 GB on the demo)
            del crops
            crops = pretrain_crops(net, images, settings,
                                   np.random.default_rng((settings.seed, 1, block)), cut_bar)
        order = rng.permutation(len(crops))
        while len(order) < steps_per_epoch * settings.pretrain_batch:  # a smaller redraw
            order = np.concatenate([order, rng.permutation(len(crops))])
        order = torch.as_tensor(order)
        # only the crop each region's step reads: half of a draw's crops, when it lasts an epoch
        used = order[:steps_per_epoch * settings.pretrain_batch].view(steps_per_epoch, -1)
        context_steps = torch.tensor([sizes[(step + k) % len(sizes)] != size
                                      for k in range(steps_per_epoch)])
        crops.cut(used[~context_steps].flatten(), used[context_steps].flatten())
        for k in range(steps_per_epoch):
            idx = order[k * settings.pretrain_batch:(k + 1) * settings.pretrain_batch]
            y = crops.labels[idx].to(device)
            flip = rng.random() < 0.5
            s = sizes[step % len(sizes)]
            window = None
            x = crops.batch(idx, context=s != size).to(device)
            if s != size:      # the box at side s with its context, pooled on its own window
                side, window = context_inputs[s]
                if side != x.shape[-1]:
                    x = F.interpolate(x, size=(side, side), mode="bilinear",
                                      align_corners=False, antialias=side < x.shape[-1])
            if flip:
                x = x.flip(3)
            if settings.pretrain_color:
                x = photometric_jitter(x, settings.pretrain_color, rng, settings.pretrain_hue)
            _cosine_lr(optimizer, settings.pretrain_lr, step, total)
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=settings.pretrain_precision == "bf16"):
                conv5 = net.trunk(x)
            conv5 = conv5.float()      # the heads in fp32, as validated (a no-op in fp32)
            if window is not None and crops.aspect:    # each box its own window
                pooled = spp_pool_batch(conv5, crop_windows(net, crops, idx, side, flip),
                                        net.spp_levels)
            elif window is not None:
                pooled = spp_full_window(
                    net, conv5[:, :, window[1]:window[3] + 1, window[0]:window[2] + 1])
            else:
                pooled = spp_full_window(net, conv5)
            loss = F.cross_entropy(heads["spp"](net.spp_fc(pooled)), y)
            if s == size:
                loss = loss + F.cross_entropy(
                    heads["rcnn"](net.rcnn_fc(net.pool5(conv5).flatten(1))), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"epoch {epoch + 1} loss {np.mean(losses[-20:]):.3f}")
        epoch += 1
        if epoch - first_epoch == 1:
            warm = time.perf_counter()      # the session's first epoch sets up the kernels
        if minutes and "epochs" not in notes and epoch - first_epoch == 3:
            # judged once, on the session's second and third epochs (crop cutting included;
            # on the AVX2 host the first two took 3-11% longer than the mean of all), so that
            # the learning rate's schedule is set early and a resumed run keeps it
            now = time.perf_counter()
            per_epoch = (now - warm) / 2
            fit = epochs_in_minutes(epoch, epochs, spent + now - began, per_epoch, minutes)
            notes["epochs"] = fit
            if fit < epochs:
                tqdm.write(f"pretrain: {per_epoch:.1f} s an epoch here, so {fit} of the "
                           f"budget's {epochs} epochs fit in {minutes:g} minutes "
                           "(--pretrain-minutes M; 0: the whole budget)", file=sys.stderr)
                epochs, total = fit, steps_per_epoch * fit
                bar.total = total
                bar.refresh()
        if epoch < epochs:
            notes["seconds"] = spent + time.perf_counter() - began
            save_progress(progress, key, step, modules, optimizer, rng, losses, notes)
    bar.close()
    net.eval()
    if progress is not None:
        progress.unlink(missing_ok=True)
    log = {"crops": len(crops), "epochs": epochs, "steps": total,
           "final_loss": float(np.mean(losses[-50:])),
           "seconds": time.perf_counter() - start}
    if epochs < budget_epochs:
        log["budget_epochs"] = budget_epochs
    return log


# ---------------------------------------------------------------------------------------------
# 2. fine-tuning


def trunk_digest(net: DetectorNet) -> str:
    """A short hash of the trunk's weights: names the conv5 cache, so that a new trunk never
    reads another trunk's maps."""
    h = hashlib.sha256()
    for name, tensor in net.trunk.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def cached_conv5(net: DetectorNet, images: Sequence[TrainImage], scales: tuple[int, ...],
                 max_side: int, folder: Path, quiet: bool = False,
                 memory_gib: float = 4.0, mirrored: bool = False) -> Conv5Cache:
    """conv5 maps of every image (flipped left to right when `mirrored`) at every scale, read
    from `folder` (fp16 `.pt` files, written atomically, so a stopped run resumes) or computed
    once and stored there; held in memory up to `memory_gib`, the rest read from the files when
    used (`detection.conv5_cache`)."""
    def compute(i: int) -> list[Tensor]:
        pixels = images[i].pixels[:, ::-1] if mirrored else images[i].pixels
        with torch.inference_mode():
            return conv_maps(net, pixels, scales, max_side).maps

    # keyed by the pixels' size too: an image read in another frame (an EXIF-turned photo
    # whose annotation names its stored pixels) is not served the turned frame's maps
    ids = [f"{item.image_id}\0{item.pixels.shape[1]}x{item.pixels.shape[0]}"
           + ("\0mirrored" if mirrored else "") for item in images]
    return build_conv5_cache(compute, ids, folder, len(scales), memory_gib, quiet,
                             "conv5 cache (flipped)" if mirrored else "conv5 cache")


def conv5_budget(settings: TrainSettings) -> float:
    """GiB of memory for each of SPP-net's conv5 caches: `conv5_memory`, shared by the maps of
    the images and of their mirror images when fine-tuning uses both."""
    return settings.conv5_memory / (2 if settings.spp_mirror else 1)


def finetune_iterations(settings: TrainSettings, method: str) -> int:
    """Fine-tuning iterations of `method`: the setting, or 1500 for SPP-net (fc layers on cached
    conv5, cheap per step) and 400 for R-CNN (all layers on warped windows)."""
    return settings.finetune_iters or (1500 if method == "spp" else 400)


def finetune(net: DetectorNet, method: str, images: Sequence[TrainImage], num_classes: int,
             settings: TrainSettings, device: torch.device, scales: tuple[int, ...] = (688,),
             max_side: int = 2000, conv_cache: Path | None = None, quiet: bool = False,
             progress: Path | None = None, save_every: int = 100,
             maps: Sequence[list[Tensor]] | None = None,
             mirrored_maps: Sequence[list[Tensor]] | None = None) -> tuple[nn.Linear, dict]:
    """Stage 2: fine-tune `method`'s head (R-CNN: all layers, or fc6-fc8 only with
    `settings.rcnn_freeze_conv`) with a new (K+1)-way fc8; SPP-net
    pools each window from the conv5 map of the scale that the test would pool it at (the
    paper's rule: the box closest to the target side), the target jittered per image and step;
    with `settings.spp_finetune_conv` (beyond the paper) the conv layers learn too, each image
    run through the trunk at the scales its windows need, BatchNorm's statistics kept. Returns
    fc8 (the softmax scorer) and a log dict. With `progress`, a checkpoint is written there
    every `save_every` iterations and a stopped run goes on from the last one. SPP-net with its
    conv layers frozen reads `maps` (`cached_conv5` of `images` at `scales`) when given, else
    the cache; with `settings.spp_mirror` each image is drawn flipped left to right half the
    time (as R-CNN flips its windows), pooled from `mirrored_maps` (`cached_conv5(...,
    mirrored=True)`) or the cache (or, conv layers learning, from the flipped image itself)."""
    rng = np.random.default_rng(settings.seed + 1)
    torch.manual_seed(settings.seed + 1)
    fc8 = nn.Linear(net.feature_dim, num_classes + 1).to(device)
    conv_tuned = method == "spp" and settings.spp_finetune_conv
    if conv_tuned:
        modules = {"trunk": net.trunk, "spp_fc": net.spp_fc, "fc8": fc8}
    elif method == "spp":
        if conv_cache is None and (maps is None or (settings.spp_mirror and
                                                    mirrored_maps is None)):
            raise ValueError("SPP-net's fine-tuning needs conv5 maps: pass maps (and "
                             "mirrored_maps, with spp_mirror) or a conv_cache folder")
        if maps is None:
            maps = cached_conv5(net, images, scales, max_side, conv_cache, quiet,
                                conv5_budget(settings))
        if not settings.spp_mirror:
            mirrored_maps = None
        elif mirrored_maps is None:
            mirrored_maps = cached_conv5(net, images, scales, max_side, conv_cache, quiet,
                                         conv5_budget(settings), mirrored=True)
        modules = {"spp_fc": net.spp_fc, "fc8": fc8}
    elif settings.rcnn_freeze_conv:
        modules = {"rcnn_fc": net.rcnn_fc, "fc8": fc8}
    else:
        modules = {"trunk": net.trunk, "rcnn_fc": net.rcnn_fc, "fc8": fc8}
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = _adamw(params, lr=settings.finetune_lr, weight_decay=settings.weight_decay)
    iterations = finetune_iterations(settings, method)
    per_image = settings.finetune_batch // settings.finetune_images
    key = run_key("finetune", method, settings, num_classes, scales, trunk_digest(net),
                  [im.image_id for im in images])
    first, losses, _ = load_progress(progress, key, modules, optimizer, rng)
    start = time.perf_counter()
    bar = _progress(range(first, iterations), f"finetune {method}", total=iterations,
                    quiet=quiet)
    bar.update(first)
    for step in bar:
        _cosine_lr(optimizer, settings.finetune_lr, step, iterations)
        chosen = rng.choice(len(images), settings.finetune_images,
                            replace=len(images) < settings.finetune_images)
        targets = []
        if method == "rcnn":
            net.train()
            if settings.rcnn_freeze_conv:       # BatchNorm statistics frozen with the weights
                net.trunk.eval()
            pairs = []
            for i in chosen:
                item = images[i]
                rows = sample_rows(item.regions, per_image, settings.fg_fraction, rng,
                                   (settings.finetune_bg_min, FG_IOU))
                pairs.append((net.preprocess(item.pixels), item.regions.boxes[rows]))
                targets.append(item.regions.label[rows])
            x = warp_images(pairs, net.crop_size)
            if rng.random() < 0.5:
                x = x.flip(3)
            with torch.set_grad_enabled(not settings.rcnn_freeze_conv):
                pool5 = net.pool5(net.trunk(x)).flatten(1)
            logits = fc8(net.rcnn_fc(pool5))
        elif conv_tuned:
            optimizer.zero_grad(set_to_none=True)
            loss = _spp_conv_step(net, fc8, [images[i] for i in chosen], settings, scales,
                                  max_side, per_image, rng, device)
        else:
            net.spp_fc.train()
            windows, fmaps = [], []
            with torch.no_grad():
                for i in chosen:
                    item = images[i]
                    rows = sample_rows(item.regions, per_image, settings.fg_fraction, rng,
                                       (settings.finetune_bg_min, FG_IOU))
                    # each window at the scale where the test pools it (closest to the box
                    # target), the target jittered by up to sqrt(2) either way
                    h, w = item.pixels.shape[:2]
                    boxes = item.regions.boxes[rows]
                    source = maps
                    if mirrored_maps is not None and rng.random() < 0.5:
                        source, boxes = mirrored_maps, mirror_boxes(boxes, w)
                    conv = ConvMaps([scale_factor(h, w, s, max_side) for s in scales],
                                    [m.to(device) for m in source[i]])
                    target = box_target_side(net.crop_size) * 2 ** rng.uniform(-0.5, 0.5)
                    found = box_windows(net, conv, boxes, target)
                    found[:, 0] += len(fmaps)        # the map's index among this step's maps
                    windows.append(found)
                    fmaps.extend(conv.maps)
                    targets.append(item.regions.label[rows])
                pooled = spp_pool_maps(fmaps, torch.cat(windows), net.spp_levels)
            logits = fc8(net.spp_fc(pooled))
        if not conv_tuned:
            loss = F.cross_entropy(logits, torch.cat(targets).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix_str(f"loss {np.mean(losses[-20:]):.3f}")
        if (step + 1) % save_every == 0 and step + 1 < iterations:
            save_progress(progress, key, step + 1, modules, optimizer, rng, losses)
        release_now_and_then(step + 1, every=100)   # windows of every size fragment the heap
    net.eval()
    if progress is not None:
        progress.unlink(missing_ok=True)
    return fc8.eval(), {"iterations": iterations, "images": len(images),
                        "final_loss": float(np.mean(losses[-50:])),
                        "seconds": time.perf_counter() - start}


def _spp_conv_step(net: DetectorNet, fc8: nn.Linear, chosen: Sequence[TrainImage],
                   settings: TrainSettings, scales: tuple[int, ...], max_side: int,
                   per_image: int, rng: np.random.Generator, device: torch.device) -> Tensor:
    """One minibatch of SPP-net's fine-tuning with the conv layers learning: the gradients of
    the mean loss over the images' windows, accumulated image by image (the trunk's BatchNorm
    uses its pre-trained statistics, so the sum is the whole minibatch's gradient) so that only
    one image's graph is held at a time (seed 9's stand-in: `train` peaked at 5.50 GB with all
    four at once, 4.77 GB this way). Returns the loss, detached."""
    net.spp_fc.train()
    net.trunk.eval()
    drawn = []
    for item in chosen:
        rows = sample_rows(item.regions, per_image, settings.fg_fraction, rng,
                           (settings.finetune_bg_min, FG_IOU))
        flip = settings.spp_mirror and rng.random() < 0.5
        target = box_target_side(net.crop_size) * 2 ** rng.uniform(-0.5, 0.5)
        drawn.append((item, rows, flip, target))
    count = sum(len(rows) for _, rows, _, _ in drawn)
    total = torch.zeros((), device=device)
    for item, rows, flip, target in drawn:
        if not len(rows):           # an image without a window to learn from
            continue
        pixels, boxes = item.pixels, item.regions.boxes[rows]
        if flip:
            pixels, boxes = pixels[:, ::-1], mirror_boxes(boxes, pixels.shape[1])
        conv, windows = conv_maps_for_boxes(net, pixels, boxes, scales, max_side, target)
        logits = fc8(net.spp_fc(spp_pool_maps(conv.maps, windows, net.spp_levels)))
        loss = F.cross_entropy(logits, item.regions.label[rows].to(device),
                               reduction="sum") / count
        loss.backward()
        total += loss.detach()
    return total


# ---------------------------------------------------------------------------------------------
# 3-4. SVMs and box regression on features of every training region


@dataclass
class RowFeatures:
    """Features of some rows of one training image: `rows` indexes its regions."""

    image_id: str
    regions: LabelledRegions
    rows: Tensor


def region_features(net: DetectorNet, method: str, images: Sequence[TrainImage],
                    settings: ExtractSettings, quiet: bool = False,
                    rows_of: Callable[[TrainImage], Tensor] | None = None,
                    cached: tuple[tuple[int, ...], Sequence[list[Tensor]]] | None = None
                    ) -> Iterator[tuple[RowFeatures, Tensor, Tensor]]:
    """`(rows, pooled, fc7)` of the rows of every image (all rows, or the mask `rows_of(image)`),
    one image at a time (never the whole split's features in memory). SPP-net with `cached`
    (`(scales, maps)` of `cached_conv5`, scales including the settings') pools from those conv5
    maps, as its fine-tuning does, instead of running the conv layers again."""
    device = next(net.parameters()).device
    for i, item in _progress(enumerate(images), f"{method} features", total=len(images),
                             quiet=quiet):
        rows = (torch.arange(len(item.regions)) if rows_of is None
                else torch.nonzero(rows_of(item)).flatten())
        boxes = item.regions.boxes[rows]
        if method == "spp" and cached is not None:
            h, w = item.pixels.shape[:2]
            entry = cached[1][i]          # from memory or read once from the disk cache
            conv = ConvMaps([scale_factor(h, w, s, settings.max_side) for s in settings.scales],
                            [entry[cached[0].index(s)].to(device).float()
                             for s in settings.scales])
            pooled, fc7 = spp_from_maps(net, conv, boxes, settings, return_pooled=True)
        else:
            pooled, fc7 = extract(net, item.pixels, boxes, method, settings, return_pooled=True)
        yield RowFeatures(item.image_id, item.regions, rows), pooled.cpu(), fc7.cpu()


def load_training_images(dataset, proposals: dict[str, np.ndarray],
                         on_error: Callable[[str], None] | None = None,
                         max_input: tuple[int, int] | None = None) -> list[TrainImage]:
    """The split's images in memory with their labelled regions (images without proposals or
    that cannot be read are reported and left out). Each is read in the frame its boxes were
    annotated in (`VOCImage.load`); images whose size still differs from their annotation's
    (resized after annotating, say) are reported once, with a count: their boxes are used as
    annotated. Boxes reaching beyond their image are clipped to it and boxes wholly outside
    it left out, each kind reported once with a count (`boxes_in_image`). With `max_input`
    (shorter, longer: the largest input of any stage), a larger photo is held downscaled to it
    (`fit_input`) with its boxes scaled along, so that memory and time follow the net's inputs,
    not the camera's (160 photos of 12 MP: 5.8 GB as read)."""
    from data.errors import ImageLoadError
    from data.voc import plural
    from detection.boxes import boxes_in_image, scale_boxes
    from detection.regions import training_objects

    out, mismatched = [], []
    beyond: dict[str, list] = {"outside": [], "reaching": []}   # (image, boxes) per kind
    for image in dataset.images:
        if image.image_id not in proposals:
            continue
        try:
            pixels = image.load()
        except ImageLoadError as exc:
            if on_error:
                on_error(str(exc))
            continue
        if (pixels.shape[1], pixels.shape[0]) != (image.width, image.height):
            mismatched.append((image, pixels.shape[1], pixels.shape[0]))
        gt_boxes, gt_labels = training_objects(image, dataset.classes)
        gt_boxes, outside, reaching = boxes_in_image(gt_boxes, pixels.shape[1], pixels.shape[0])
        for kind, found in (("outside", outside), ("reaching", reaching)):
            if found.any():
                beyond[kind].append((image, int(found.sum())))
        gt_boxes, gt_labels = gt_boxes[~outside], gt_labels[~outside]
        boxes = torch.as_tensor(proposals[image.image_id], dtype=torch.float32).reshape(-1, 4)
        scale = (1.0, 1.0)
        if max_input:
            pixels, scale = fit_input(pixels, *max_input)
            gt_boxes, boxes = scale_boxes(gt_boxes, *scale), scale_boxes(boxes, *scale)
        regions = label_regions(boxes, gt_boxes, gt_labels, len(dataset.classes))
        out.append(TrainImage(image.image_id, pixels, regions, scale))
    if mismatched and on_error:
        image, width, height = mismatched[0]
        more = f" ({plural(len(mismatched) - 1, 'more image')} like it)" \
            if len(mismatched) > 1 else ""
        on_error(f"{image.path}: the annotation says {image.width}x{image.height} but the image "
                 f"is {width}x{height}; its boxes are used as annotated and may not line "
                 f"up{more}")
    if on_error:
        for kind, what in (("reaching", "reaches beyond its image: clipped to it for training"),
                           ("outside", "lies wholly outside its image: left out of training")):
            if beyond[kind]:
                image, _ = beyond[kind][0]
                count = sum(n for _, n in beyond[kind])
                more = f" ({plural(count - 1, 'more box', 'es')} like it in the split)" \
                    if count > 1 else ""
                on_error(f"{dataset.root / 'Annotations' / (image.image_id + '.xml')}: an "
                         f"object's box {what}{more}")
    return out
