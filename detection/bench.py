"""The paper's per-image timing table: conv time and fc time of SPP-net (1 and 5 scales) and of
R-CNN on real images with their real proposals, the speedup, and where the time goes (FLOPs and
achieved GFLOP/s beside a measured fp32 matmul rate on the same device).

Each figure is the median over the timed images after a warm-up image; the device is synchronised
around each stage (`StageTimer`). R-CNN may be timed on a random sample of K regions per image and
extrapolated linearly to all regions (its cost is per region): such rows say so.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from detection.backbones import DetectorNet
from detection.features import ExtractSettings, conv_maps, extract, fc_features, pool_windows, rcnn_pool5
from detection.timing import StageTimer, synchronize


@dataclass(frozen=True)
class BenchRow:
    """One method's configuration in the table."""

    name: str
    method: str
    scales: tuple[int, ...]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the convolutions and matrix products that `fn` runs (torch's flop counter)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return int(counter.get_total_flops())


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                  repeats: int = 5) -> float:
    """Achieved GFLOP/s of an `n x n` matrix product on `device` (median of `repeats`): the
    reference limit the conv and fc stages are compared with."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    with torch.inference_mode():
        a @ b
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def region_flops(net: DetectorNet, image: np.ndarray, row: BenchRow,
                 settings: ExtractSettings) -> dict[str, int]:
    """FLOPs that each region costs in a row: fc6 + fc7 for both methods, and for R-CNN also
    conv1-5 + pool5 on its warp (these do not depend on the region's size)."""
    one = torch.tensor([[0.0, 0.0, 31.0, 31.0]])
    with torch.inference_mode():
        return _region_flops(net, image, row, settings, one)


def _region_flops(net: DetectorNet, image: np.ndarray, row: BenchRow, settings: ExtractSettings,
                  one: torch.Tensor) -> dict[str, int]:
    if row.method == "spp":
        conv = conv_maps(net, image, row.scales[:1], settings.max_side)
        pooled = pool_windows(net, conv, one)
        return {"conv": 0, "fc": count_flops(lambda: fc_features(net.spp_fc, pooled))}
    pooled = rcnn_pool5(net, image, one, net.crop_size, settings.context)
    return {"conv": count_flops(lambda: rcnn_pool5(net, image, one, net.crop_size,
                                                   settings.context)),
            "fc": count_flops(lambda: fc_features(net.rcnn_fc, pooled))}


def time_row(net: DetectorNet, image: np.ndarray, boxes: torch.Tensor, row: BenchRow,
             settings: ExtractSettings, sample: int | None, rng: np.random.Generator,
             device: torch.device) -> dict[str, float]:
    """Seconds per stage for one image; R-CNN on `sample` regions is scaled to all of them."""
    timer = StageTimer(device)
    row_settings = replace(settings, scales=row.scales)
    scale = 1.0
    if row.method == "rcnn" and sample and sample < len(boxes):
        picked = np.sort(rng.choice(len(boxes), size=sample, replace=False))
        scale = len(boxes) / sample
        boxes = boxes[torch.as_tensor(picked)]
    extract(net, image, boxes, row.method, row_settings, timer)
    seconds = {k: v * scale for k, v in timer.seconds.items()}
    seconds.setdefault("pool", 0.0)
    seconds["total"] = seconds["conv"] + seconds["pool"] + seconds["fc"]
    return seconds


def device_description(device: torch.device) -> str:
    """A human name of the device, e.g. the GPU's name or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def run_bench(net: DetectorNet, images: Sequence[tuple[str, np.ndarray, np.ndarray]],
              rows: Sequence[BenchRow], settings: ExtractSettings, device: torch.device,
              rcnn_sample: int | None = None, seed: int = 0,
              progress: Callable[[str], None] | None = None) -> dict:
    """Time every row on every image (`(image_id, HxWx3 uint8, boxes [N, 4])`) after one untimed
    warm-up pass on the first image. Per row: median seconds per stage over the images, and the
    achieved GFLOP/s of conv and fc (total FLOPs over total seconds of the timed images)."""
    rng = np.random.default_rng(seed)
    _, first_image, first_boxes = images[0]
    warm = torch.as_tensor(first_boxes[: min(len(first_boxes), 64)], dtype=torch.float32)
    for row in rows:
        time_row(net, first_image, warm, row, settings, None, rng, device)
    per_region = {row.name: region_flops(net, first_image, row, settings) for row in rows}
    conv_flops_of_shape: dict[tuple, int] = {}    # SPP conv FLOPs depend on the image size only
    out = {}
    for row in rows:
        times, conv_flops, fc_flops = [], 0.0, 0.0
        for image_id, image, boxes in images:
            if progress:
                progress(f"{row.name}: {image_id}")
            box_tensor = torch.as_tensor(boxes, dtype=torch.float32)
            times.append(time_row(net, image, box_tensor, row, settings, rcnn_sample, rng,
                                  device))
            n = len(boxes)
            fc_flops += n * per_region[row.name]["fc"]
            if row.method == "spp":
                key = (row.scales, image.shape)
                if key not in conv_flops_of_shape:
                    conv_flops_of_shape[key] = count_flops(
                        lambda: conv_maps(net, image, row.scales, settings.max_side))  # noqa: B023
                conv_flops += conv_flops_of_shape[key]
            else:
                conv_flops += n * per_region[row.name]["conv"]
        med = {k: float(statistics.median(t[k] for t in times))
               for k in ("conv", "pool", "fc", "total")}
        conv_time = sum(t["conv"] for t in times)
        fc_time = sum(t["fc"] for t in times)
        out[row.name] = {
            "method": row.method, "scales": list(row.scales),
            "conv_s": med["conv"], "pool_s": med["pool"], "fc_s": med["fc"],
            "total_s": med["total"],
            "conv_gflops": conv_flops / len(images) / 1e9,
            "fc_gflops": fc_flops / len(images) / 1e9,
            "conv_gflops_per_s": conv_flops / 1e9 / conv_time if conv_time else None,
            "fc_gflops_per_s": fc_flops / 1e9 / fc_time if fc_time else None,
            "extrapolated_from": (rcnn_sample if row.method == "rcnn" and rcnn_sample
                                  and any(rcnn_sample < len(b) for _, _, b in images) else None),
        }
    regions = float(np.median([len(b) for _, _, b in images]))
    return {"rows": out, "regions_per_image": regions, "images": len(images)}


def format_table(result: dict, paper: bool = True) -> str:
    """The paper's table: per row conv, pool, fc, total seconds and the speedup over R-CNN."""
    rows = result["rows"]
    rcnn_total = next((r["total_s"] for r in rows.values() if r["method"] == "rcnn"), None)
    lines = [f"{'method':<18} {'conv s':>8} {'pool s':>8} {'fc s':>8} {'total s':>9} "
             f"{'speedup':>8} {'conv GF/s':>9} {'fc GF/s':>8}"]
    for name, r in rows.items():
        speed = f"{rcnn_total / r['total_s']:.1f}x" if rcnn_total and r["total_s"] else "-"
        note = f"  (R-CNN timed on {r['extrapolated_from']} regions per image, scaled up)" \
            if r["extrapolated_from"] else ""
        lines.append(f"{name:<18} {r['conv_s']:>8.3f} {r['pool_s']:>8.3f} {r['fc_s']:>8.3f} "
                     f"{r['total_s']:>9.3f} {speed:>8} {r['conv_gflops_per_s'] or 0:>9.1f} "
                     f"{r['fc_gflops_per_s'] or 0:>8.1f}{note}")
    if paper:
        lines.append("paper (ZF-5, GPU): SPP-net 1-scale 0.053 + 0.089 = 0.142 s, "
                     "R-CNN 8.96 + 0.07 = 9.03 s, 64x")
    return "\n".join(lines)


def bench_split(dataset, preset, workdir, device: torch.device, images: int,
                rcnn_sample: int | None = None, multiscale: bool = True,
                weights: str | None = None, jobs: int | None = None,
                progress: Callable[[str], None] | None = None,
                spp_scales: tuple[int, ...] | None = None) -> dict:
    """`sppnet bench` on the first `images` images of a split: their cached proposals, a net of
    the preset (timing does not depend on the weights' values), every row timed. `spp_scales`
    replaces the preset's single scale in the first SPP-net row (the `spp` entry). Returns the
    JSON summary."""
    import sys

    from data.errors import SppnetError
    from data.images import load_image
    from detection.backbones import build_net
    from detection.pipeline import dataset_proposals

    if not dataset.images:
        raise SppnetError(f"{dataset.root}: split {dataset.split!r} lists no images")
    dataset.images = dataset.images[:images]
    boxes, run = dataset_proposals(dataset, workdir, preset.max_proposals, jobs,
                                   progress=progress is not None)
    loaded = [(im.image_id, load_image(im.path), boxes[im.image_id])
              for im in dataset.images if im.image_id in boxes]
    if not loaded:
        raise SppnetError("no image of the split could be read")
    net = build_net(preset.backbone, weights, crop_size=preset.crop_size).to(device).eval()
    first = tuple(spp_scales or preset.scales())
    first_name = "SPP-net 1-scale" if len(first) == 1 else f"SPP-net {len(first)}-scale"
    rows = [BenchRow(first_name, "spp", first)]
    if multiscale and first != preset.scales(multi=True):
        rows.append(BenchRow("SPP-net 5-scale", "spp", preset.scales(multi=True)))
    rows.append(BenchRow("R-CNN", "rcnn", (preset.scale,)))
    settings = ExtractSettings(max_side=preset.max_side)
    if progress:
        print(f"timing {len(loaded)} images of {dataset.name}/{dataset.split}, {preset.name} "
              f"preset ({preset.backbone}), on {device_description(device)}", file=sys.stderr)
    result = run_bench(net, loaded, rows, settings, device, rcnn_sample, progress=progress)
    table = result["rows"]
    spp, rcnn = table[first_name], table["R-CNN"]
    timed = {i[0] for i in loaded}
    ss = [r.seconds for r in run.results if r.key in timed]
    multi = table.get("SPP-net 5-scale") if first_name != "SPP-net 5-scale" else None
    return {
        "spp": spp, "spp_5scale": multi, "rcnn": rcnn,
        "speedup": rcnn["total_s"] / spp["total_s"],
        "speedup_5scale": rcnn["total_s"] / multi["total_s"] if multi else None,
        "matmul_gflops_per_s": matmul_gflops(device),
        "selective_search_s": float(np.median(ss)) if ss else None,
        "regions_per_image": result["regions_per_image"], "images": result["images"],
        "preset": preset.name, "backbone": preset.backbone,
        "device": device_description(device), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rows": table,
    }


def format_summary(summary: dict) -> str:
    """The table and the lines under it, as `sppnet bench` prints them."""
    lines = [format_table({"rows": summary["rows"]})]
    if summary["selective_search_s"] is not None:
        lines.append(f"selective search (CPU, outside the table): "
                     f"{summary['selective_search_s']:.2f} s per image (median)")
    lines.append(f"speedup (R-CNN total / first SPP-net row's total): {summary['speedup']:.1f}x; "
                 f"fp32 matmul {summary['matmul_gflops_per_s']:.0f} GFLOP/s; "
                 f"{summary['regions_per_image']:.0f} regions per image; {summary['device']}; "
                 f"torch {summary['versions']['torch']}")
    return "\n".join(lines)
