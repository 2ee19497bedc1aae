"""`sppnet demo`: the whole comparison in one command on the bundled generated dataset.

It makes the demo dataset if missing, computes proposals, trains and evaluates SPP-net and R-CNN
with the `small` preset, times both per image, and prints one table like the paper's (mAP, conv,
fc, total, speedup). Everything goes under `WORKDIR`; a second run reuses the dataset, the
proposals and the trained models.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from data.atomic import atomic_write_text
from data.voc import open_voc
from detection.model import load_detector
from detection.pipeline import evaluate_detector, model_path, train_detector
from detection.presets import get_preset
from detection.train import TrainSettings

DEMO_METHODS = ("spp", "rcnn")
# the demo pre-trains its trunk for a sixth of `train`'s default epochs so that it finishes in
# minutes on a 2-core CPU; its mAPs are those of this shorter schedule (README)
DEMO_PRETRAIN_EPOCHS = 16


def demo_settings(seed: int) -> TrainSettings:
    """The training schedule of the demo: `train`'s (augmented pre-training, flips in SPP-net's
    fine-tuning), with the demo's shorter pre-training and in fp32 on every host, so that its
    figures do not depend on the host's bf16."""
    return TrainSettings(seed=seed, pretrain_epochs=DEMO_PRETRAIN_EPOCHS,
                         pretrain_precision="fp32")


def _log(text: str) -> None:
    print(text, file=sys.stderr)


def demo_table(summary: dict) -> str:
    """The closing table: per method mAP, conv, fc, total seconds per image and speedup."""
    rows = [f"{'method':<10} {'mAP':>6} {'conv s':>8} {'fc s':>8} {'total s':>8} {'speedup':>8}"]
    rcnn_total = summary["rcnn"]["total_s"]
    for method, name in (("spp", "SPP-net"), ("rcnn", "R-CNN")):
        r = summary[method]
        rows.append(f"{name:<10} {r['mAP']:>6.3f} {r['conv_s']:>8.3f} {r['fc_s']:>8.3f} "
                    f"{r['total_s']:>8.3f} {rcnn_total / r['total_s']:>7.1f}x")
    return "\n".join(rows)


def run_demo(workdir: str | Path, device: torch.device, seed: int = 0, jobs: int | None = None,
             bench_images: int = 3, quiet: bool = False) -> dict:
    """Run the demo; returns `{"spp": {"mAP", "conv_s", "fc_s", "total_s"}, "rcnn": {...},
    "speedup": float}` plus details."""
    from data.demo import generate_demo_dataset
    from detection.bench import bench_split

    start = time.perf_counter()
    workdir = Path(workdir)
    root = workdir / "demo-data"
    if not (root / "demo.json").is_file():
        _log(f"demo: writing the demo dataset to {root}")
        generate_demo_dataset(root, seed=seed)
    preset = get_preset("small")
    trainval = open_voc(root, "trainval")
    test = open_voc(root, "test", trainval.classes)
    summary: dict = {"dataset": str(root), "preset": preset.name}
    for method in DEMO_METHODS:
        path = model_path(workdir, trainval.name, preset, method)
        if path.is_file():
            _log(f"demo: reusing the trained {method} model {path}")
        else:
            _log(f"demo: training {method}")
            path, _ = train_detector(trainval, method, preset, workdir, demo_settings(seed),
                                     device, jobs=jobs, quiet=quiet)
        detector = load_detector(path, device)
        _log(f"demo: evaluating {method} on {len(test)} test images")
        result = evaluate_detector(detector, test, workdir, workdir / "demo" / method,
                                   jobs=jobs, quiet=quiet)
        summary[method] = {"mAP": result["mAP"], "ap": result["ap"],
                           "scales": result["scales"], "model": str(path)}
    _log("demo: timing both methods per image")
    bench = bench_split(open_voc(root, "test", trainval.classes), preset, workdir, device,
                        bench_images, multiscale=False, jobs=jobs,
                        spp_scales=tuple(summary["spp"]["scales"]))   # as evaluated
    for method in DEMO_METHODS:
        row = bench[method]
        summary[method].update({"conv_s": row["conv_s"], "fc_s": row["fc_s"] + row["pool_s"],
                                "total_s": row["total_s"]})
    summary["speedup"] = bench["speedup"]
    summary["device"] = bench["device"]
    summary["seconds"] = time.perf_counter() - start
    write_demo_report(workdir / "demo", summary)
    return summary


def write_demo_report(out_dir: Path, summary: dict) -> Path:
    """`report.md` of the demo: the closing table, per-class AP and links to each method's PR
    curves and examples."""
    lines = ["# sppnet demo", "", f"Dataset: `{summary['dataset']}` ({summary['preset']} "
             f"preset), device: {summary['device']}.", "", "```", demo_table(summary), "```", "",
             "fc s includes SPP-net's pyramid pooling; times are medians per test image, SPP-net "
             f"at the scales it was evaluated with ({'+'.join(map(str, summary['spp']['scales']))}"
             " px).", ""]
    for method in DEMO_METHODS:
        lines += [f"## {method}", "", f"[report]({method}/report.md)", "",
                  f"![PR curves]({method}/pr_curves.png)", ""]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines))
