"""The `sppnet` command line: one subcommand per task, each with its own `--help`.

Every user-caused failure (a bad file, a wrong path) is an `SppnetError` and ends as one line on
stderr with exit status 2; a summary goes to `--json PATH` where a command has one.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from data.cli_args import (fraction_below_one, non_negative_float, non_negative_int,
                           positive_int)
from data.errors import SppnetError

if TYPE_CHECKING:
    from data.voc import VOCDataset

WORKDIR_ENV = "SPPNET_WORKDIR"
DEFAULT_WORKDIR = "sppnet-work"


def default_workdir() -> Path:
    """Where caches, models and outputs go: `$SPPNET_WORKDIR`, else `./sppnet-work`."""
    return Path(os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR)


def _write_json(path: str | None, summary: dict) -> None:
    if path:
        from data.atomic import atomic_write_json

        atomic_write_json(path, summary)


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    """Write the procedurally generated demo dataset in VOC layout."""
    from data.demo import generate_demo_dataset

    out = Path(args.out) if args.out else Path(args.workdir) / "demo-data"
    summary = generate_demo_dataset(out, seed=args.seed, trainval=args.trainval, test=args.test)
    print(f"wrote {summary['images']} images with {summary['objects']} objects of "
          f"{len(summary['classes'])} classes to {out} in {summary['seconds']:.1f} s")
    _write_json(args.json, summary)
    return 0


def _say_split_problems(dataset: VOCDataset, known_as: str) -> None:
    """On stderr, before scoring a split: the classes it has no object of (their AP is '-',
    outside the mAP; another case or a typo in the annotations is the usual cause), the
    annotated names that are not among the classes scored (`known_as` says whose): their objects
    are no ground truth, so a detection on one is a false positive, and objects annotated wholly
    outside their image, which count as missed."""
    from data.voc import (missing_classes_message, objects_outside_message, plural,
                          short_list)

    missing = missing_classes_message(dataset)
    if missing:
        print(f"warning: {missing}; such a class scores '-' and stays out of the mAP",
              file=sys.stderr)
    others = dataset.names_outside_classes()
    if others:
        print(f"note: {dataset.root}/ImageSets/Main/{dataset.split}.txt: objects of "
              f"{plural(len(others), 'class', 'es')} not among {known_as} count as background: "
              f"{short_list(others)}", file=sys.stderr)
    outside = objects_outside_message(dataset)
    if outside:
        print(f"warning: {outside}", file=sys.stderr)


def cmd_score(args: argparse.Namespace) -> int:
    """Score VOC result files against a split: per-class AP, mAP, COCO AP."""
    from data.results import read_voc_results
    from data.voc import open_voc, parse_class_list
    from detection.evaluate import evaluate_coco, evaluate_voc, format_ap_table, score_summary

    dataset = open_voc(args.voc_root, args.split, parse_class_list(args.classes),
                       need_images=False)
    det_dir = Path(args.dets)
    if not det_dir.is_dir():
        raise SppnetError(f"{det_dir}: detections folder not found")
    detections, missing = read_voc_results(det_dir, args.split, dataset.classes)
    if len(missing) == len(dataset.classes):
        raise SppnetError(f"{det_dir}: no result files comp4_det_{args.split}_<class>.txt for any "
                          f"of the {len(dataset.classes)} classes")
    if missing:
        print(f"note: no result file for {', '.join(missing)}; counted as no detections",
              file=sys.stderr)
    _say_split_problems(dataset, "--classes")
    voc = evaluate_voc(dataset, detections, metric=args.metric)
    coco = evaluate_coco(dataset, detections)
    title = "AP07" if args.metric == "voc07" else "AP"
    print(format_ap_table(voc["ap"], voc["mAP"], title=title))
    if coco["AP"] is not None:
        print(f"COCO AP@[.5:.95] {100 * coco['AP']:.1f}  AP50 {100 * coco['AP50']:.1f}  "
              f"AP75 {100 * coco['AP75']:.1f}")
    _write_json(args.json, score_summary(voc, coco))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train SPP-net or R-CNN on a VOC-layout split."""
    if args.pretrain_minutes is not None and args.pretrain_epochs is not None:
        raise SppnetError("--pretrain-epochs N runs exactly N epochs; --pretrain-minutes caps "
                          "the step budget instead: give one of them")
    import torch

    from data.voc import missing_classes_message, open_voc, parse_class_list
    from detection.devices import resolve_device
    from detection.pipeline import train_detector
    from detection.presets import get_preset
    from detection.regions import FG_IOU
    from detection.train import TrainSettings

    preset = get_preset(args.preset)
    device = resolve_device(args.device)
    classes = parse_class_list(args.classes)
    dataset = open_voc(args.voc_root, args.split, classes)
    if not dataset.images:
        raise SppnetError(f"{dataset.root}: split {args.split!r} lists no images")
    missing = missing_classes_message(dataset)
    if missing and classes:  # named by the user: nothing to train it on
        raise SppnetError(missing)
    if missing:  # found in other splits' annotations: trained without positives
        print(f"warning: {missing}; such a class is trained without positives "
              f"(--classes leaves it out)",
              file=sys.stderr)
    settings = TrainSettings(seed=args.seed)
    if args.finetune_iters:
        settings = replace(settings, finetune_iters=args.finetune_iters)
    if args.pretrain_epochs is not None:
        settings = replace(settings, pretrain_epochs=args.pretrain_epochs)
    if args.pretrain_steps is not None:
        settings = replace(settings, pretrain_steps=args.pretrain_steps)
    if args.pretrain_minutes is not None:
        settings = replace(settings, pretrain_minutes=args.pretrain_minutes)
    if args.pretrain_redraw is not None:
        settings = replace(settings, pretrain_redraw=args.pretrain_redraw)
    if args.pretrain_color is not None:
        settings = replace(settings, pretrain_color=args.pretrain_color)
    if args.pretrain_hue is not None:
        settings = replace(settings, pretrain_hue=args.pretrain_hue)
    if args.pretrain_aspect is not None:
        settings = replace(settings, pretrain_aspect=args.pretrain_aspect)
    if args.pretrain_precision is not None:
        if (args.pretrain_precision == "bf16" and device.type == "cuda"
                and not torch.cuda.is_bf16_supported()):
            raise SppnetError("--pretrain-precision bf16: this GPU has no bf16 arithmetic "
                              "(compute capability 8.0 or later has it)")
        settings = replace(settings, pretrain_precision=args.pretrain_precision)
    if args.memory is not None:
        settings = replace(settings, pretrain_crop_memory=args.memory, conv5_memory=args.memory)
    if args.finetune_bg_min is not None:
        if args.finetune_bg_min >= FG_IOU:
            raise SppnetError(f"--finetune-bg-min {args.finetune_bg_min}: must be below "
                              f"{FG_IOU}, where windows count as objects")
        settings = replace(settings, finetune_bg_min=args.finetune_bg_min)
    if args.no_mirror:
        if args.method != "spp":
            raise SppnetError("--no-mirror is an SPP-net ablation: R-CNN always flips its "
                              "training windows")
        settings = replace(settings, spp_mirror=False)
    if args.freeze_conv:
        if args.method != "rcnn":
            raise SppnetError("--freeze-conv is an R-CNN ablation: SPP-net's conv layers are "
                              "always frozen")
        settings = replace(settings, rcnn_freeze_conv=True)
    if args.finetune_conv:
        if args.method != "spp":
            raise SppnetError("--finetune-conv is SPP-net's: R-CNN always fine-tunes its conv "
                              "layers")
        settings = replace(settings, spp_finetune_conv=True)
    torch.manual_seed(args.seed)
    _check_scales_method(args)
    scales = _parse_scales(args.scales, preset)
    path, summary = train_detector(dataset, args.method, preset, args.workdir, settings, device,
                                   scales=scales, weights=args.weights,
                                   box_regression=not args.no_box_regression, jobs=args.jobs,
                                   scorer=args.scorer, quiet=args.quiet)
    print(f"trained {args.method} on {summary['images']} images of {dataset.name}/{args.split} "
          f"in {summary['seconds']:.0f} s: {path}")
    _write_json(args.json, {**summary, "model": str(path)})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained detector on a split: result files, AP table, PR curves, report."""
    from data.voc import open_voc
    from detection.detect import is_within
    from detection.devices import resolve_device
    from detection.evaluate import format_ap_table
    from detection.model import describe_inputs, load_detector
    from detection.pipeline import MODELS_APART, evaluate_detector, model_path
    from detection.presets import get_preset

    _check_scales_method(args)
    device = resolve_device(args.device)
    preset = get_preset(args.preset)
    if args.model:
        path = Path(args.model)
    else:
        from data.voc import resolve_root

        path = model_path(args.workdir, resolve_root(args.voc_root).name, preset, args.method)
        if not path.is_file():
            apart = path.with_name(MODELS_APART[args.method])
            hint = (f" (or pass the model trained apart, --model {apart})"
                    if apart.is_file() else "")
            raise SppnetError(f"{path}: no trained {args.method} model; run `sppnet train "
                              f"--method {args.method}` with the same --workdir first{hint}")
    detector = load_detector(path, device)
    if detector.method != args.method:
        raise SppnetError(f"{path}: a {detector.method} model, not {args.method}")
    if args.scales:
        detector.scales = _parse_scales(args.scales, detector.preset)
    if args.scorer == "svm" and detector.svm is None:
        raise SppnetError(f"{path}: trained without SVMs; train with --scorer svm")
    if args.scorer:
        detector.scorer = args.scorer
    detector.test_mirror = not args.no_test_mirror
    detector.box_voting = not args.no_box_voting
    dataset = open_voc(args.voc_root, args.split, detector.classes)
    for option, path in (("--out", args.out), ("--json", args.json)):
        if path and is_within(path, dataset.root):
            raise SppnetError(f"{option} {path}: inside the dataset {dataset.root}; eval never "
                              "writes into a dataset, choose a place outside it")
    _say_split_problems(dataset, "the model's classes")
    summary = evaluate_detector(detector, dataset, args.workdir, args.out, args.metric,
                                args.jobs, quiet=args.quiet)
    print(format_ap_table(summary["ap"], summary["mAP"],
                          title="AP07" if args.metric == "voc07" else "AP"))
    beyond = (", conv layers fine-tuned (beyond the paper)"
              if detector.method == "spp" and detector.conv_fine_tuned else "")
    passes = (beyond + (", mirror pass" if detector.test_mirror else "")
              + (", box voting" if detector.box_voting else ""))
    print(f"{args.method} ({describe_inputs(summary)}, {detector.scorer}{passes}): "
          f"mAP {summary['mAP']:.3f}; result files, pr_curves.png and report.md in {args.out}")
    _write_json(args.json, summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole comparison on the bundled generated dataset, in one command."""
    from detection.demo import demo_table, run_demo
    from detection.devices import resolve_device

    summary = run_demo(args.workdir, resolve_device(args.device), seed=args.seed, jobs=args.jobs,
                       quiet=args.quiet)
    print(demo_table(summary))
    print(f"small preset, {summary['device']}; {summary['seconds']:.0f} s in all; report: "
          f"{Path(args.workdir) / 'demo' / 'report.md'}")
    _write_json(args.json, summary)
    return 0


def _check_scales_method(args: argparse.Namespace) -> None:
    """`--scales` is SPP-net's: R-CNN warps every region from the original image."""
    if args.scales and args.method != "spp":
        raise SppnetError("--scales sets SPP-net's image scales: R-CNN warps every region from "
                          "the original image")


def _parse_scales(text: str | None, preset) -> tuple[int, ...] | None:
    """`--scales`: '1' (the preset's single scale), 'multi' or '5' (its multi-scale set: the
    paper's five scales, the `small` preset's eight) or sizes '480,688'."""
    if not text:
        return None
    if text == "1":
        return preset.scales()
    if text in ("multi", "5"):
        return preset.scales(multi=True)
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SppnetError(f"--scales {text!r}: expected 1, multi, 5 or sizes like 480,688"
                          ) from None


def cmd_bench(args: argparse.Namespace) -> int:
    """The paper's per-image timing table for both methods on real images and proposals."""
    import torch

    from data.voc import open_voc, parse_class_list
    from detection.bench import bench_split, format_summary
    from detection.devices import resolve_device
    from detection.presets import get_preset

    preset = get_preset(args.preset)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = open_voc(args.voc_root, args.split, parse_class_list(args.classes))
    summary = bench_split(dataset, preset, args.workdir, device, args.images,
                          rcnn_sample=args.rcnn_sample, multiscale=not args.no_multiscale,
                          weights=args.weights, jobs=args.jobs,
                          progress=lambda text: print(f"  {text}", file=sys.stderr),
                          variants=_variant_list(args.variants), map_workdir=args.map_workdir)
    print(format_summary(summary))
    _write_json(args.json, summary)
    return 0


def _variant_list(text: str | None) -> list[str] | None:
    """`--variants`: None, `auto`, or comma-separated speedup names (checked here)."""
    if not text:
        return None
    if text == "auto":
        return ["auto"]
    from detection.speedups import parse_variant

    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        parse_variant(name)
    return names


def cmd_detect(args: argparse.Namespace) -> int:
    """Detect objects in every image under a folder: COCO JSON, CSV and annotated copies."""
    from detection.detect import run_detect_command

    return run_detect_command(args.dir, args.out, model=args.model, workdir=args.workdir,
                              method=args.method, score_threshold=args.score_threshold,
                              device=args.device, jobs=args.jobs, json_path=args.json,
                              quiet=args.quiet, test_mirror=not args.no_test_mirror,
                              box_voting=not args.no_box_voting)


def _add_test_pass_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-test-mirror", action="store_true",
                   help="score each image in one pass, as both papers did, not also flipped "
                        "left to right with the two passes' scores and boxes averaged (half "
                        "the time, lower mAP)")
    p.add_argument("--no-box-voting", action="store_true",
                   help="keep each box where NMS left it, as both papers did, instead of "
                        "moving it to the score-weighted mean of its class's boxes overlapping "
                        "it at IoU 0.5 or more")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")


def _add_dataset(p: argparse.ArgumentParser, split_help: str = "image set, e.g. test") -> None:
    """--voc-root and --split, shared by the commands that read a VOC split."""
    p.add_argument("--voc-root", required=True, metavar="R", help="VOC-layout dataset root")
    p.add_argument("--split", required=True, metavar="S", help=split_help)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """--device, --jobs and --quiet, shared by the commands that run the networks."""
    p.add_argument("--device", metavar="D", help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--jobs", type=positive_int, metavar="N", help="selective search processes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_workdir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", metavar="W", default=str(default_workdir()),
                   help=f"folder for caches, models and outputs (default: ${WORKDIR_ENV} or "
                        f"./{DEFAULT_WORKDIR})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sppnet", description="SPP-net object detection and its R-CNN baseline.")
    parser.add_argument("--version", action="version", version=f"sppnet {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("make-demo-data", help="write the generated demo dataset (VOC layout)",
                       description="Write the procedurally generated demo dataset in VOC layout: "
                                   "the same bytes for the same seed.")
    p.add_argument("--out", metavar="DIR", help="output root (default: WORKDIR/demo-data)")
    _add_workdir(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--trainval", type=non_negative_int, default=200, metavar="N",
                   help="trainval images (default 200)")
    p.add_argument("--test", type=non_negative_int, default=100, metavar="M",
                   help="test images (default 100)")
    _add_json(p)
    p.set_defaults(func=cmd_make_demo_data)

    p = sub.add_parser("score", help="score VOC result files: per-class AP, mAP, COCO AP",
                       description="Read comp4_det_<split>_<class>.txt files and print the "
                                   "per-class AP table and mAP (VOC devkit rules), with COCO "
                                   "AP@[.5:.95] from pycocotools for the same detections.")
    _add_dataset(p)
    p.add_argument("--dets", required=True, metavar="DIR", help="folder of result files")
    p.add_argument("--metric", choices=("voc07", "area"), default="voc07",
                   help="voc07: 11-point AP (default); area: VOC2010+ area under the curve")
    p.add_argument("--classes", metavar="a,b,c",
                   help="class list (default: VOC's 20 for VOC20xx, else found in annotations)")
    _add_json(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("bench", help="the paper's per-image conv/fc timing table, both methods",
                       description="Time SPP-net (1 scale and multi-scale) and R-CNN per "
                                   "image on real images with their selective-search proposals: "
                                   "conv time, pooling, fc time, total and speedup, with FLOPs "
                                   "and GFLOP/s.")
    _add_dataset(p)
    p.add_argument("--images", type=positive_int, default=5, metavar="N",
                   help="images to time (default 5; the first is also the warm-up)")
    p.add_argument("--preset", default="paper", choices=("paper", "small"),
                   help="network and scales (default paper: ZF-5, 688 px, 2000 proposals)")
    p.add_argument("--weights", metavar="W",
                   help="random (default), imagenet, or a weights file; timing does not "
                        "depend on the values")
    p.add_argument("--device", metavar="D", help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--threads", type=positive_int, metavar="T", help="CPU threads for torch")
    p.add_argument("--rcnn-sample", type=positive_int, metavar="K",
                   help="time R-CNN on K random regions per image and scale up to all regions "
                        "(labelled as extrapolated)")
    p.add_argument("--no-multiscale", action="store_true", help="skip the multi-scale SPP-net row")
    p.add_argument("--variants", nargs="?", const="auto", metavar="V1,V2",
                   help="also time SPP-net with speedups (dedup, svd, channels_last, bf16, fp16, "
                        "joined by '+', e.g. dedup+svd); alone: every switch this device gains "
                        "from, then the best combination")
    p.add_argument("--map-workdir", metavar="W",
                   help="a workdir where `sppnet demo` ran: measure each variant's mAP change "
                        "on the demo test split with the demo's SPP-net model")
    p.add_argument("--jobs", type=positive_int, metavar="N", help="selective search processes")
    p.add_argument("--classes", metavar="a,b,c", help="class list (only to read the split)")
    _add_workdir(p)
    _add_json(p)
    p.set_defaults(func=cmd_bench)

    for name, func, helptext in (
            ("train", cmd_train, "train SPP-net or R-CNN on a VOC-layout split"),
            ("eval", cmd_eval, "evaluate a trained detector: VOC result files, AP, PR curves")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        _add_dataset(p, "image set (train: trainval; eval: test)")
        p.add_argument("--method", required=True, choices=("spp", "rcnn"))
        p.add_argument("--preset", default="small", choices=("paper", "small"),
                       help="network, scales and proposals (default small: CPU-sized)")
        p.add_argument("--scales", metavar="1|multi|S,S",
                       help="SPP-net scales: 1, multi or 5 (the preset's multi-scale set: the "
                            "paper's five, small's eight) or sizes; train's default: chosen on "
                            "validation")
        _add_run_options(p)
        _add_workdir(p)
        _add_json(p)
        p.set_defaults(func=func)
        if name == "train":
            p.add_argument("--classes", metavar="a,b,c",
                           help="class list (default: VOC's 20 for VOC20xx, else found in "
                                "annotations)")
            p.add_argument("--weights", metavar="W",
                           help="start the trunk from imagenet (alexnet/vgg16) or a file "
                                "instead of pre-training it here")
            p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
            p.add_argument("--scorer", choices=("svm", "softmax"),
                           help="score boxes with SVMs (trained with hard negative mining) or "
                                "the fine-tuned softmax (default: the preset's: paper svm, "
                                "small softmax)")
            p.add_argument("--no-box-regression", action="store_true",
                           help="skip bounding-box regression")
            p.add_argument("--finetune-iters", type=positive_int, metavar="N",
                           help="fine-tuning iterations")
            length = p.add_mutually_exclusive_group()
            length.add_argument("--pretrain-epochs", type=positive_int, metavar="N",
                                help="trunk pre-training epochs (default: those that fill "
                                     "--pretrain-steps; `sppnet demo` uses 16)")
            length.add_argument("--pretrain-steps", type=positive_int, metavar="N",
                                help="budget of the trunk's pre-training in steps of 64 crops, "
                                     "filled with whole epochs: fewer on a split with many objects "
                                     "per image, more on one with few (default 10800: 150 epochs "
                                     "on about 160 images of 2.5 objects)")
            p.add_argument("--pretrain-minutes", type=non_negative_float, metavar="M",
                           help="end the pre-training at the budget's epochs that fit in M "
                                "minutes, judged by its second and third epochs, never below "
                                "half the budget (default 20; 0: the whole budget however long "
                                "it takes; not with --pretrain-epochs)")
            p.add_argument("--pretrain-redraw", type=non_negative_int, metavar="N",
                           help="draw new jittered and background regions for the trunk's "
                                "pre-training every N epochs (default 1; 0: once)")
            p.add_argument("--pretrain-color", type=fraction_below_one, metavar="S",
                           help="colour jitter of the pre-training crops: saturation and "
                                "contrast x 1+-S, channels shifted by up to S pixel spreads "
                                "(default 0.6; 0: none)")
            p.add_argument("--pretrain-hue", type=fraction_below_one, metavar="H",
                           help="of that shift, at most H pixel spreads are each channel's own, "
                                "which turns hues, and the rest is common to the three "
                                "(brightness): for classes told apart by their colour (default: "
                                "all of it; 0.15 turns a photo's hues by a median 5 degrees "
                                "instead of 16)")
            p.add_argument("--pretrain-aspect", action=argparse.BooleanOptionalAction,
                           help="the SPP head's pre-training crops keep each box's shape, as "
                                "SPP-net's test sees it, instead of squashing it to a square "
                                "as R-CNN's warps do (default: off)")
            p.add_argument("--pretrain-precision", choices=("auto", "fp32", "bf16"),
                           help="number format of the trunk's forward pass in pre-training: "
                                "bf16 (autocast; weights stay fp32) is faster on a CPU with "
                                "native bf16 (AVX512-BF16, AMX), elsewhere it may not be; auto: "
                                "bf16 on such a CPU, fp32 elsewhere, GPUs included (default "
                                "auto)")
            p.add_argument("--memory", type=non_negative_float, metavar="GIB",
                           help="RAM for each training cache: the pre-training crops and "
                                "SPP-net's conv5 maps are held in memory up to this and read "
                                "or cut per step beyond it, with the same results (default: "
                                "2 for the crops, 4 for the maps)")
            p.add_argument("--finetune-bg-min", type=fraction_below_one, metavar="IOU",
                           help="fine-tuning's background windows: best IoU with the ground "
                                "truth in [IOU, 0.5) (default 0.1, as SPP-net and Fast R-CNN; "
                                "R-CNN's paper used 0)")
            p.add_argument("--no-mirror", action="store_true",
                           help="SPP-net ablation: fine-tune on the images as they are, not "
                                "also flipped left to right (from their own conv5 maps)")
            p.add_argument("--freeze-conv", action="store_true",
                           help="R-CNN ablation: fine-tune fc6, fc7, fc8 only, conv frozen as "
                                "SPP-net's")
            p.add_argument("--finetune-conv", action="store_true",
                           help="SPP-net beyond the paper (as Fast R-CNN later did): fine-tune "
                                "the conv layers too, on whole images, at about 30 times "
                                "the fine-tuning time; saved as spp-finetuned-conv.pt next to "
                                "spp.pt (eval it with --model)")
        else:
            p.add_argument("--out", required=True, metavar="DIR",
                           help="folder for result files, pr_curves.png, report.md")
            p.add_argument("--model", metavar="PATH", help="a detector file (default: the "
                                                           "one trained in --workdir)")
            p.add_argument("--metric", choices=("voc07", "area"), default="voc07")
            p.add_argument("--scorer", choices=("svm", "softmax"),
                           help="score with the SVMs or the fine-tuned softmax (default: the "
                                "one the model was trained for)")
            _add_test_pass_options(p)

    p = sub.add_parser(
        "detect", help="detect objects in every image under a folder",
        description="Run a trained detector on every image under DIR (recursively; images are "
                    "recognised by content, EXIF orientation applied). Writes to OUT: "
                    "detections.json (COCO format: images, categories, scored annotations with "
                    "bbox [x, y, w, h]), detections.csv (file,class,score,x1,y1,x2,y2 in 0-based "
                    "pixels, box corners inclusive) and annotated/ copies. Files that cannot be "
                    "read are reported and skipped; DIR is never written; a rerun skips the "
                    "images already done.")
    p.add_argument("dir", metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output folder (not inside DIR)")
    where = p.add_mutually_exclusive_group()
    _add_workdir(where)
    where.add_argument("--model", metavar="PATH",
                       help="a detector file (default: the newest one trained in --workdir)")
    p.add_argument("--method", choices=("spp", "rcnn"),
                   help="which model of --workdir to use (default spp)")
    p.add_argument("--score-threshold", type=float, metavar="T",
                   help="keep detections scoring above T (default: the confident ones, an "
                        "SVM margin above 0 or a softmax probability above 0.5)")
    _add_test_pass_options(p)
    _add_run_options(p)
    _add_json(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("demo", help="make the demo dataset, train, evaluate and time both methods",
                       description="Make the generated demo dataset if missing, compute "
                                   "proposals, train and evaluate SPP-net and R-CNN (small "
                                   "preset), time both per image, and print one table like "
                                   "the paper's. A second run reuses what is cached.")
    _add_workdir(p)
    p.add_argument("--seed", type=int, default=0, help="dataset and training seed (default 0)")
    _add_run_options(p)
    _add_json(p)
    p.set_defaults(func=cmd_demo)

    from proposals.command import register as register_proposals

    register_proposals(sub, _add_workdir, _add_json)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sppnet")
    except Exception:  # not installed (run from a checkout)
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sppnet` console script; returns the exit status."""
    from detection.memory import bound_onednn_primitive_cache

    bound_onednn_primitive_cache()      # before any convolution runs
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SppnetError as exc:
        print(f"sppnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sppnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
