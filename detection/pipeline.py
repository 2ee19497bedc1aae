"""The `train` and `eval` runs: proposals through the cache, the training stages with a
checkpoint after each (a stopped run resumes), and evaluation with result files, PR curves and a
report. Models live in `WORKDIR/models/<dataset>-<preset>/`."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data.errors import SppnetError
from data.voc import VOCDataset
from detection.backbones import (DetectorNet, build_net, load_checkpoint, prefer_channels_last,
                                 save_checkpoint)
from detection.features import ConvMaps, conv_maps
from detection.memory import release_free_memory, release_now_and_then
from detection.model import Detector, in_photo_pixels, load_detector
from detection.presets import Preset

if TYPE_CHECKING:
    from detection.train import TrainSettings

DEFAULT_SCORER = "svm"
# models trained apart, beside a method's own, which they never replace: SPP-net with its conv
# layers fine-tuned (`--finetune-conv`, beyond the paper), R-CNN with them frozen (`--freeze-conv`)
MODELS_APART = {"spp": "spp-finetuned-conv.pt", "rcnn": "rcnn-frozen-conv.pt"}


def model_dir(workdir: str | Path, dataset_name: str, preset: Preset) -> Path:
    """Folder of the models trained on one dataset with one preset."""
    return Path(workdir) / "models" / f"{dataset_name}-{preset.name}"


def model_path(workdir: str | Path, dataset_name: str, preset: Preset, method: str) -> Path:
    """The final detector file of a method."""
    return model_dir(workdir, dataset_name, preset) / f"{method}.pt"


def dataset_proposals(dataset: VOCDataset, workdir: str | Path, max_proposals: int,
                      jobs: int | None = None, scheduler: str | None = None,
                      progress: bool = True):
    """Selective-search boxes `{image_id: [N, 4]}` of a split through the proposal cache, and
    the run; bad images are reported on stderr and left out."""
    from proposals.cache import ProposalCache
    from proposals.runner import run_proposals
    from proposals.selective_search import ProposalSettings

    settings = ProposalSettings(max_proposals=max_proposals)
    cache = ProposalCache.for_dataset(workdir, dataset.name, settings)
    run = run_proposals([(im.image_id, im.path) for im in dataset.images], settings, cache,
                        jobs=jobs, scheduler=scheduler, progress=progress,
                        stored_orientation=dataset.stored_orientation_ids())
    for error in run.errors:
        print(f"skipped {error}", file=sys.stderr)
    return {r.key: r.boxes for r in run.results}, run


def _log(text: str) -> None:
    print(text, file=sys.stderr)


def trunk_recipe(settings: TrainSettings, weights: str | None) -> dict:
    """What a trunk depends on besides its data and classes: the weights it starts from and,
    when it is pre-trained here, the pre-training settings (memory budgets aside: they give the
    same weights)."""
    from detection.train import MEMORY_FIELDS

    if weights not in (None, "random"):
        return {"weights": str(weights)}
    fields = {k: v for k, v in asdict(settings).items()
              if k.startswith("pretrain_") and k not in MEMORY_FIELDS}
    hue = fields["pretrain_hue"]      # recorded as None where it turns nothing or all
    if hue is not None and (hue >= settings.pretrain_color or not settings.pretrain_color):
        fields["pretrain_hue"] = None
    return {"weights": None, "seed": settings.seed, "weight_decay": settings.weight_decay,
            **fields}


def _recipe_change(old: dict, new: dict) -> str:
    """`pretrain_epochs 16 -> 48, ...`: the entries where two recipes differ (only the weights
    when those differ: the pre-training settings of weights loaded from elsewhere mean nothing)."""
    if old.get("weights") != new.get("weights"):
        return " -> ".join(f"weights {w}" if w else "pre-trained here"
                           for w in (old.get("weights"), new.get("weights")))
    def shown(key: str, value: object) -> object:
        return "the budget's" if key == "pretrain_epochs" and value is None else value

    return ", ".join(f"{k} {shown(k, old.get(k))} -> {shown(k, new.get(k))}"
                     for k in sorted({*old, *new}) if old.get(k) != new.get(k))


SCHEDULE_FIELDS = ("pretrain_epochs", "pretrain_steps", "pretrain_minutes")


def same_trunk_recipe(made_with: dict, recipe: dict, log: dict) -> bool:
    """Whether a saved trunk, pre-trained by `made_with` (its `log`: the epochs and steps it
    ran), is the trunk `recipe` would make. The epochs and the step budget count only through
    the epochs they give (`pretrain_epochs_run`), so a trunk made with `--pretrain-epochs`
    or under another budget is reused where the budget gives the same epochs; so does
    the time cap, so a trunk that ran its whole budget is reused under any cap, and one the
    cap cut short only under the same cap."""
    from detection.train import pretrain_epochs_run

    def rest(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in SCHEDULE_FIELDS}

    if made_with == recipe:
        return True
    if rest(made_with) != rest(recipe) or recipe.get("weights") is not None:
        return False
    ran = log.get("epochs", made_with.get("pretrain_epochs"))
    steps = log.get("steps")
    if not ran or not steps or steps % ran:
        return False
    return pretrain_epochs_run(recipe["pretrain_epochs"], recipe["pretrain_steps"],
                               steps // ran) == ran


def _trunk(dataset: VOCDataset, images, preset: Preset, folder: Path, settings,
           device: torch.device, weights: str | None, quiet: bool) -> tuple[DetectorNet, dict]:
    """Stage 1, shared by both methods: load the pre-trained trunk or train and save it. A saved
    trunk is reused when its classes and recipe (`trunk_recipe`) match the run's; one of
    another recipe (say `--pretrain-epochs`) is made again."""
    from detection.train import EARLIER_RECIPE, pretrain_trunk, resolve_pretrain_precision

    path = folder / "trunk.pt"
    # the recipe records the precision pre-training runs in, never "auto"
    asked = settings.pretrain_precision
    settings = replace(settings, pretrain_precision=resolve_pretrain_precision(asked, device))
    recipe = trunk_recipe(settings, weights)
    if path.is_file():
        config = load_checkpoint(path)["config"]
        made_with = config.get("recipe")
        if made_with and made_with.get("weights") is None:
            # the augmentation and precision settings came after the first recorded recipes:
            # a trunk saved without them was pre-trained without augmentation, in fp32
            made_with = {**EARLIER_RECIPE, **made_with}
        same = made_with is None or same_trunk_recipe(made_with, recipe, config.get("log", {}))
        if config.get("classes") == list(dataset.classes) and same:
            _log(f"trunk: reusing {path}" + ("" if made_with else
                 " (made by an earlier version, which did not record its settings; delete it "
                 "to pre-train with this run's)"))
            return prefer_channels_last(build_net(preset.backbone, path).to(device)), \
                config.get("log", {})
        if not same:
            _log(f"trunk: {path} was made with other settings "
                 f"({_recipe_change(made_with, recipe)}); making it again")
    net = prefer_channels_last(build_net(preset.backbone, weights, crop_size=preset.crop_size,
                                         seed=settings.seed).to(device))
    if weights not in (None, "random"):
        _log(f"trunk: starting from {weights}, no pre-training")
        log = {"weights": str(weights)}
    else:
        why = f": {asked} on this {device.type.upper()}" if asked == "auto" else ""
        _log("trunk: pre-training on crops of the training split (multi-size, SPP head, "
             f"{settings.pretrain_precision}{why})")
        log = pretrain_trunk(net, images, len(dataset.classes), settings, device, quiet,
                             progress=folder / "trunk.progress.pt")
    save_checkpoint(net, path, {"classes": list(dataset.classes), "recipe": recipe, "log": log})
    return net, log


def train_detector(dataset: VOCDataset, method: str, preset: Preset, workdir: str | Path,
                   settings, device: torch.device, scales: tuple[int, ...] | None = None,
                   weights: str | None = None, box_regression: bool = True,
                   jobs: int | None = None, scorer: str | None = None,
                   quiet: bool = False) -> tuple[Path, dict]:
    """Train `method` ('spp' or 'rcnn') on `dataset`; returns the model file and a summary.
    SVMs are trained when the scorer (default: the preset's) is 'svm'."""
    from svm import LinearSVMDetector
    from svm.mining import ImageBatch

    from detection.bbox_regression import BoxRegressor
    from detection.train import (cached_conv5, conv5_budget, finetune, finetune_iterations,
                                 load_training_images, region_features, trunk_digest)

    start = time.perf_counter()
    folder = model_dir(workdir, dataset.name, preset)
    folder.mkdir(parents=True, exist_ok=True)
    proposals, _ = dataset_proposals(dataset, workdir, preset.max_proposals, jobs,
                                     progress=not quiet)
    # the preset's, not the run's scales: the trunk, which both methods share, is made from the
    # same pixels whichever trains first
    images = load_training_images(dataset, proposals, on_error=_log,
                                  max_input=preset.largest_input())
    if not images:
        raise SppnetError(f"{dataset.root}: no readable training image in split {dataset.split}")
    net, trunk_log = _trunk(dataset, images, preset, folder, settings, device, weights, quiet)
    release_free_memory()       # each stage below starts from the live data, not the heap's peak
    torch.manual_seed(settings.seed)
    frozen = method == "rcnn" and settings.rcnn_freeze_conv
    conv_tuned = method == "spp" and settings.spp_finetune_conv
    what = ("all layers on whole images (beyond the paper)" if conv_tuned else
            "fc6, fc7, fc8 on cached conv5" if method == "spp" else
            "fc6, fc7, fc8 on warped windows, conv frozen" if frozen else
            "all layers on warped windows")
    choose_scale = method == "spp" and scales is None
    train_scales = candidate_scales(preset) if choose_scale else (scales or preset.scales())
    tune_images, val_images = split_validation(images) if choose_scale else (images, [])
    _log(f"{method}: fine-tuning {what}"
         + (f" on {len(tune_images)} images, scales {train_scales}" if choose_scale else ""))
    conv_cache = (Path(workdir) / "conv5"
                  / f"{dataset.name}-{trunk_digest(net)}-{'-'.join(map(str, train_scales))}")
    # the layers the second fit below starts again from
    pretrained = {name: {k: v.clone() for k, v in getattr(net, name).state_dict().items()}
                  for name in (("spp_fc", "trunk") if conv_tuned else ("spp_fc",))}
    progress = folder / f"{method}.finetune.progress.pt"     # a stopped run goes on from here
    # the fit that ranks the scales has its own file: run again after a stop in the final fit,
    # it must not overwrite that fit's checkpoint (with --finetune-conv, up to 20 minutes)
    choice_progress = folder / f"{method}.scale-choice.progress.pt"
    # the fit that ranks the test scales on validation images only needs their order (on the
    # demo's 3 seeds the multi-scale set led the best single scale by 0.18-0.22 mAP after a full
    # fit, 0.23-0.30 after a fifth of it), so it runs a fraction of the schedule; the final fit
    # below runs all of it
    fit_settings = (replace(settings, finetune_iters=max(1, round(
        finetune_iterations(settings, method) * settings.scale_choice_fraction)))
        if choose_scale else settings)
    # SPP-net's conv5 maps of every training image, computed or read once for both fits and
    # for the SVM and box-regression windows (the paper's conv5 feature cache)
    choosing = choose_scale and bool(val_images)
    all_maps, tune_maps, all_mirrored, tune_mirrored = None, None, None, None
    if method == "spp" and not conv_tuned:
        all_maps = cached_conv5(net, images, train_scales, preset.max_side, conv_cache, quiet,
                                conv5_budget(settings))
        index_of = {item.image_id: i for i, item in enumerate(images)}
        tune_index = [index_of[item.image_id] for item in tune_images]
        tune_maps = all_maps.select(tune_index)
        if settings.spp_mirror:
            all_mirrored = cached_conv5(net, images, train_scales, preset.max_side, conv_cache,
                                        quiet, conv5_budget(settings), mirrored=True)
            tune_mirrored = all_mirrored.select(tune_index)
        release_free_memory()
    fc8, finetune_log = finetune(net, method, tune_images, len(dataset.classes), fit_settings,
                                 device, train_scales, preset.max_side, conv_cache, quiet,
                                 choice_progress if choosing else progress, maps=tune_maps,
                                 mirrored_maps=tune_mirrored)
    scale_log, choice_log = None, None
    if choosing:
        choice_log = finetune_log
        scales, scale_log = choose_test_scale(net, fc8, dataset, preset, val_images,
                                              train_scales)
        release_free_memory()
        _log(f"spp: test scales {'+'.join(map(str, scales))} chosen on {len(val_images)} "
             f"validation images ({', '.join(f'{s}: {m:.3f}' for s, m in scale_log.items())} "
             f"mAP)")
        # the choice made, the validation images go back into training (R-CNN trains on all
        # of them too): fine-tune again from the pre-trained head (and trunk) on the whole split
        _log(f"spp: fine-tuning again on all {len(images)} images")
        net.spp_fc.load_state_dict(pretrained["spp_fc"])
        if conv_tuned:
            net.trunk.load_state_dict(pretrained["trunk"])
        fc8, finetune_log = finetune(net, method, images, len(dataset.classes), settings,
                                     device, train_scales, preset.max_side, conv_cache, quiet,
                                     progress, maps=all_maps, mirrored_maps=all_mirrored)
    scales = tuple(scales or preset.scales())
    scorer = scorer or preset.scorer
    detector = Detector(net, method, dataset.classes, preset, tuple(scales), fc8, scorer=scorer)
    min_iou = 0.5 if method == "spp" else 0.6
    regressor = BoxRegressor(len(dataset.classes), alpha=4000.0 if method == "spp" else 1000.0,
                             min_iou=min_iou) if box_regression else None
    steps = (["SVMs with hard negative mining"] if scorer == "svm" else []) + (
        ["box regression"] if box_regression else [])
    _log(f"{method}: {' and '.join(steps) or 'no SVMs, no box regression'}")
    # without SVMs only the rows that box regression learns from need features
    rows_of = (None if scorer == "svm" else
               (lambda item: item.regions.best_iou >= min_iou))

    # SPP-net's regions are pooled from the fine-tuning's conv5 maps: the conv layers run once
    # per image and scale in all of training
    cached = ((tuple(train_scales), all_maps)
              if all_maps is not None and set(scales) <= set(train_scales) else None)

    def batches():
        for item, pooled, fc7 in region_features(net, method, images, detector.settings, quiet,
                                                 rows_of, cached):
            if regressor is not None:
                gt = item.regions.gt_class > 0
                regressor.add(pooled, item.regions.boxes[item.rows], item.regions.boxes[gt],
                              item.regions.gt_class[gt])
            yield ImageBatch(fc7.numpy(), item.regions.gt_class[item.rows].numpy(),
                             item.regions.max_iou[item.rows].numpy())

    svm_start = time.perf_counter()
    if scorer == "svm":
        detector.svm = LinearSVMDetector(random_state=settings.seed).fit(batches())
    elif regressor is not None:
        for _ in batches():
            pass
    if regressor is not None:
        release_free_memory()
        regressor.fit()
    detector.box_regressor = regressor
    summary = {"method": method, "dataset": dataset.name, "split": dataset.split,
               "preset": preset.name, **detector.inputs, "images": len(images),
               "classes": list(dataset.classes), "trunk": trunk_log, "finetune": finetune_log,
               "validation_mAP_by_scale": scale_log, "scale_choice_finetune": choice_log,
               "scorer": scorer, "svm_and_box_seconds": time.perf_counter() - svm_start,
               "train_settings": asdict(settings), "seconds": time.perf_counter() - start}
    detector.info = summary
    path = model_path(workdir, dataset.name, preset, method)
    if frozen or conv_tuned:
        path = path.with_name(MODELS_APART[method])
    path = detector.save(path)
    return path, summary


def candidate_scales(preset: Preset) -> tuple[int, ...]:
    """SPP-net test scales tried on the validation images: the preset's scale and its
    multi-scale set."""
    return tuple(sorted({preset.scale, *preset.multi_scales}))


def split_validation(images: list, every: int = 4) -> tuple[list, list]:
    """A fixed validation part of the training images (every `every`-th one, by image id) and
    the rest."""
    order = sorted(range(len(images)), key=lambda i: images[i].image_id)
    val = {order[k] for k in range(every - 1, len(order), every)}
    return ([im for i, im in enumerate(images) if i not in val],
            [im for i, im in enumerate(images) if i in val])


def choose_test_scale(net: DetectorNet, fc8, dataset: VOCDataset, preset: Preset, val_images,
                      candidates: tuple[int, ...]) -> tuple[tuple[int, ...], dict[str, float]]:
    """SPP-net's test scales: each single scale of `candidates` and the preset's multi-scale
    set are tried on the validation images (never the test split), scored with the softmax;
    the best mAP wins (ties: one scale, the closest to the preset's). The conv layers run once
    per image at all candidate scales, and each option pools from its own maps among them (as
    its `detect` would, in a fraction of the time). Returns the scales and
    `{"384": mAP, ..., "224+288+...": mAP}`."""
    from data.results import detections_by_class
    from detection.evaluate import evaluate_voc

    val_set = VOCDataset(dataset.root, f"{dataset.split}-val", dataset.classes,
                         [dataset[im.image_id] for im in val_images])
    options = [(scale,) for scale in candidates] + [tuple(preset.multi_scales)]
    # one pass, without the mirror image's or box voting: the options differ by 0.18 mAP and
    # more on every set measured, which the mirror pass (+0.03) does not reorder, at half the
    # conv work
    detectors = {scales: Detector(net, "spp", dataset.classes, preset, scales, fc8,
                                  scorer="softmax", test_mirror=False, box_voting=False)
                 for scales in options}
    per_option: dict[tuple, dict] = {scales: {} for scales in options}
    every = sorted({s for scales in options for s in scales})
    for done, item in enumerate(val_images, 1):
        proposals = item.regions.boxes[item.regions.gt_class == 0]
        with torch.inference_mode():      # once per image: every option pools from these maps
            conv = conv_maps(net, item.pixels, every, preset.max_side)
        for scales, detector in detectors.items():
            at = [every.index(s) for s in scales]
            own = ConvMaps([conv.factors[k] for k in at], [conv.maps[k] for k in at])
            det = detector.detect_from_maps(item.pixels, proposals, own)
            det = in_photo_pixels(det, item.scale)
            per_option[scales][item.image_id] = {k: v.cpu().numpy() for k, v in det.items()}
        del conv
        release_now_and_then(done, every=4)     # all scales' maps at once: ~50 MB an image
    by_scale = {scales: evaluate_voc(val_set, detections_by_class(
        per_option[scales], dataset.classes))["mAP"] or 0.0 for scales in options}
    best = max(options, key=lambda s: (by_scale[s], -len(s), -abs(s[0] - preset.scale)))
    return best, {"+".join(map(str, s)): m for s, m in by_scale.items()}


def evaluate_detector(detector: Detector, dataset: VOCDataset, workdir: str | Path,
                      out_dir: str | Path, metric: str = "voc07", jobs: int | None = None,
                      examples: int = 4, quiet: bool = False) -> dict:
    """Detect on every image of the split, write VOC result files, PR curves and report.md in
    `out_dir`, and return the summary (mAP and per-class AP as fractions)."""
    from tqdm import tqdm

    from data.results import detections_by_class, write_voc_results
    from detection.evaluate import evaluate_coco, evaluate_voc
    from detection.report import draw_detections, plot_pr_curves, write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proposals, _ = dataset_proposals(dataset, workdir, detector.preset.max_proposals, jobs,
                                     progress=not quiet)
    per_image, seconds, example_files = {}, [], []
    todo = [image for image in dataset.images if image.image_id in proposals]
    group = max(1, detector.settings.batch_images)
    bar = tqdm(total=len(todo), desc=f"detect ({detector.method})", file=sys.stderr,
               disable=quiet, dynamic_ncols=True, leave=False)
    for first in range(0, len(todo), group):
        images = todo[first:first + group]
        pixels = [image.load() for image in images]
        start = time.perf_counter()
        dets = detector.detect_many(pixels, [proposals[image.image_id] for image in images])
        seconds += [(time.perf_counter() - start) / len(images)] * len(images)
        for image, image_pixels, det in zip(images, pixels, dets):
            per_image[image.image_id] = {k: v.cpu().numpy() for k, v in det.items()}
            if len(example_files) < examples:
                top = det["scores"] > (0.0 if detector.scorer == "svm" else 0.5)  # confident
                name = f"example_{len(example_files) + 1}.jpg"
                draw_detections(image_pixels, det["boxes"][top].numpy(),
                                det["labels"][top].numpy(), det["scores"][top].numpy(),
                                dataset.classes, out_dir / name)
                example_files.append(name)
        bar.update(len(images))
        release_now_and_then(first // group + 1, every=max(1, 16 // group))  # outside the timing
    bar.close()
    dets = detections_by_class(per_image, dataset.classes)
    write_voc_results(out_dir, dataset.split, dets)
    voc = evaluate_voc(dataset, dets, metric=metric)
    coco = evaluate_coco(dataset, dets)
    pr_png = plot_pr_curves(voc["curves"], voc["ap"], out_dir / "pr_curves.png",
                            f"{detector.method} on {dataset.name}/{dataset.split}")
    summary = {"method": detector.method, "dataset": dataset.name, "split": dataset.split,
               "metric": metric, "mAP": voc["mAP"], "ap": voc["ap"],
               **detector.inputs, "scorer": detector.scorer,
               "conv_fine_tuned": detector.conv_fine_tuned,
               "coco": {k: coco[k] for k in ("AP", "AP50", "AP75")},
               "images": len(per_image),
               "seconds_per_image": float(np.median(seconds)) if seconds else None}
    write_report(out_dir, summary, pr_png.name, example_files)
    return summary
