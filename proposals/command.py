"""`sppnet proposals`: selective search over a VOC split, cached, in parallel, with recall figures.

Prints images, boxes per image, seconds per image (compute time measured in the workers; for
cached images, the time measured when they were computed, plus this run's wall time) and the
recall of non-difficult ground truth at IoU 0.5 and 0.7 and average recall over 0.5:0.95.
`--json` writes `images`, `boxes_per_image`, `seconds_per_image`, `recall@0.5`, `recall@0.7`,
`average_recall` and more; `--plot` draws recall against the number of proposals.

Module-level imports stay light: cv2, torch and dask load inside the handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from data.cli_args import non_negative_int, positive_int
from data.errors import SppnetError


def register(sub: argparse._SubParsersAction, add_workdir: Callable, add_json: Callable) -> None:
    """Add the `proposals` subcommand to the `sppnet` parser."""
    p = sub.add_parser(
        "proposals", help="selective search proposals of a VOC split (cached), with recall",
        description="Compute selective search proposals (OpenCV ximgproc, as R-CNN) for every "
                    "image of a VOC split, cache them under WORKDIR/proposals/, and print boxes "
                    "and seconds per image and the recall of the ground truth. Cached images "
                    "are not recomputed; a killed run resumes.")
    p.add_argument("--voc-root", required=True, metavar="R", help="VOC-layout dataset root")
    p.add_argument("--split", required=True, metavar="S", help="image set, e.g. test")
    add_workdir(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--jobs", type=positive_int, metavar="N",
                       help="local worker processes (default: all cores)")
    where.add_argument("--scheduler", metavar="ADDR",
                       help="compute on this Dask cluster instead, e.g. tcp://127.0.0.1:8786 "
                            "(workers must see the image files; start them with --nthreads 1)")
    p.add_argument("--mode", choices=("fast", "quality"), default="fast",
                   help="selective search mode (default fast, as R-CNN and SPP-net)")
    p.add_argument("--max-proposals", type=positive_int, default=2000, metavar="K",
                   help="keep the K best ranked boxes per image (default 2000)")
    p.add_argument("--min-size", type=non_negative_int, default=20, metavar="PX",
                   help="drop boxes narrower or lower than PX pixels of the searched image "
                        "(default 20, as R-CNN)")
    p.add_argument("--max-side", type=non_negative_int, default=500, metavar="PX",
                   help="search a copy whose longer side is at most PX, boxes scaled back "
                        "(default 500, R-CNN's demo; 0: full size)")
    p.add_argument("--classes", metavar="a,b,c",
                   help="class list (default: VOC's 20 for VOC20xx, else found in annotations)")
    add_json(p)
    p.add_argument("--plot", metavar="PNG", help="draw recall against the number of proposals")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_proposals)


def cmd_proposals(args: argparse.Namespace) -> int:
    """Run selective search over a split (cached), print and write the summary."""
    import numpy as np

    from data.voc import open_voc, parse_class_list
    from proposals.cache import ProposalCache
    from proposals.recall import recall_curve
    from proposals.runner import run_proposals
    from proposals.selective_search import ProposalSettings

    settings = ProposalSettings(mode=args.mode, max_proposals=args.max_proposals,
                                min_size=args.min_size, max_side=args.max_side or None)
    dataset = open_voc(args.voc_root, args.split, parse_class_list(args.classes))
    if not dataset.images:
        raise SppnetError(f"{dataset.root}: split {args.split!r} lists no images")
    cache = ProposalCache.for_dataset(args.workdir, dataset.name, settings)
    items = [(im.image_id, im.path) for im in dataset.images]
    run = run_proposals(items, settings, cache, jobs=args.jobs, scheduler=args.scheduler,
                        progress=not args.no_progress,
                        stored_orientation=dataset.stored_orientation_ids())
    for error in run.errors:
        print(f"error: {error}", file=sys.stderr)
    if not run.results:
        raise SppnetError(f"none of the {len(items)} images of {dataset.name}/{args.split} "
                          f"could be processed (first: {run.errors[0]})")

    by_id = {r.key: r for r in run.results}
    done = [im for im in dataset.images if im.image_id in by_id]
    stats = recall_curve([by_id[im.image_id].boxes for im in done], [im.boxes() for im in done],
                         [im.difficult() for im in done],
                         counts=_counts(settings.max_proposals))
    counts = np.array([len(r.boxes) for r in run.results])
    seconds = np.array([r.seconds for r in run.results])
    summary = {
        "images": len(run.results),
        "boxes_per_image": float(counts.mean()),
        "seconds_per_image": float(seconds.mean()),
        "recall@0.5": stats.recall_50,
        "recall@0.7": stats.recall_70,
        "average_recall": stats.average_recall,
        "objects": stats.objects,
        "median_seconds_per_image": float(np.median(seconds)),
        "min_boxes": int(counts.min()),
        "max_boxes": int(counts.max()),
        "cached": run.cached,
        "computed": run.computed,
        "errors": [str(e) for e in run.errors],
        "wall_seconds": run.wall_seconds,
        "backend": run.backend,
        "workers": run.workers,
        "dataset": dataset.name,
        "split": dataset.split,
        "cache_dir": str(cache.directory),
        "settings": settings.to_dict(),
        "settings_key": settings.key(),
        "curve": stats.to_dict()["curve"],
    }
    _print_summary(summary, run, args)
    if args.json:
        from data.atomic import atomic_write_json

        atomic_write_json(args.json, summary)
    if args.plot:
        _plot(stats, Path(args.plot), f"{dataset.name} {dataset.split}: {len(done)} images, "
                                      f"{stats.objects} objects, {settings.mode} mode")
        print(f"plot: {args.plot}")
    return 0


def _counts(max_proposals: int) -> tuple[int, ...]:
    from proposals.recall import default_counts

    return default_counts(max_proposals)


def _print_summary(summary: dict, run, args: argparse.Namespace) -> None:
    images = summary["images"]
    how = {"cache": "all from the cache",
           "inline": "computed in this process",
           "processes": f"computed by {run.workers} worker processes",
           "dask": f"computed on the Dask cluster {args.scheduler}"}[run.backend]
    print(f"proposals of {summary['dataset']}/{summary['split']}: {images} images "
          f"({run.computed} computed, {run.cached} from cache, {len(run.errors)} errors; {how})")
    print(f"  boxes per image     {summary['boxes_per_image']:.1f} "
          f"(min {summary['min_boxes']}, max {summary['max_boxes']})")
    note = ""
    if run.cached and not run.computed:
        note = " (measured when computed; served from cache now)"
    elif run.cached:
        note = f" (compute time; {run.cached} of them measured in an earlier run)"
    print(f"  seconds per image   {summary['seconds_per_image']:.3f}{note}")
    print(f"  wall time           {run.wall_seconds:.2f} s "
          f"({run.wall_seconds / max(images, 1):.3f} s per image this run)")
    print(f"  recall@0.5          {summary['recall@0.5']:.4f}  "
          f"({summary['objects']} non-difficult objects)")
    print(f"  recall@0.7          {summary['recall@0.7']:.4f}")
    print(f"  average recall      {summary['average_recall']:.4f}  (IoU 0.5:0.05:0.95)")
    print(f"  cache               {summary['cache_dir']}")


def _plot(stats, path: Path, title: str) -> None:
    """Recall at IoU 0.5 and 0.7 and average recall against the number of proposals."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    ax.plot(stats.counts, stats.curve_50, marker="o", label="recall@0.5")
    ax.plot(stats.counts, stats.curve_70, marker="s", label="recall@0.7")
    ax.plot(stats.counts, stats.curve_ar, marker="^", label="average recall (0.5:0.95)")
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image (best ranked first)")
    ax.set_ylabel("recall of non-difficult objects")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    except OSError as exc:
        raise SppnetError(f"{path}: cannot write the plot: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
