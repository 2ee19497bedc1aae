"""The paper's per-image timing table: conv time and fc time of SPP-net (1 scale and the
multi-scale set) and of R-CNN on real images with their real proposals, the speedup, and where
the time goes (FLOPs and achieved GFLOP/s beside a measured fp32 matmul rate on the same device).

Each figure is the median over the timed images after a warm-up image; the device is synchronised
around each stage (`StageTimer`). R-CNN may be timed on a random sample of K regions per image and
extrapolated linearly to all regions (its cost is per region): such rows say so.

Plain rows run the same network in strict fp32 for both methods (`speedup`). Variant rows run
SPP-net with the switches of `detection.speedups`, each against the plain R-CNN, with the mAP
change they cause on the demo set when a demo workdir is given.
"""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from detection import onednn
from detection.backbones import DetectorNet
from detection.features import ExtractSettings, conv_maps, extract, fc_features, pool_windows, rcnn_pool5
from detection.timing import StageTimer, synchronize


@dataclass(frozen=True)
class BenchRow:
    """One method's configuration in the table."""

    name: str
    method: str
    scales: tuple[int, ...]
    switches: tuple[str, ...] = ()     # speedups (`detection.speedups`); () is the plain row


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the convolutions and matrix products that `fn` runs (torch's flop counter)."""
    counter = FlopCounterMode(display=False)
    # oneDNN's linear (`detection.onednn`) is not among the counter's ops: count the same
    # products through aten's
    with torch.inference_mode(), onednn.off(), counter:
        fn()
    return int(counter.get_total_flops())


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                  repeats: int = 5) -> float:
    """Achieved GFLOP/s of an `n x n` matrix product on `device` (median of `repeats`), through
    the route the fc layers take (`onednn.linear`: oneDNN for fp32 on the CPU): the reference
    limit the conv and fc stages are compared with."""
    layer = torch.nn.Linear(n, n, device=device).to(dtype)
    a = torch.randn(n, n, device=device).to(dtype)
    times = []
    with torch.inference_mode():
        onednn.linear(layer, a)
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            onednn.linear(layer, a)
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


@contextmanager
def strict_fp32() -> Iterator[None]:
    """Plain fp32 for every row: TF32 (which cuDNN uses for convolutions by default on recent
    GPUs) is switched off, so that `speedup` compares the same network at the same precision."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
    warm-up pass on the first image. Per row: median seconds per stage over the images, and, for
    plain rows, the achieved GFLOP/s of conv and fc (total FLOPs over total seconds of the timed
    images). Rows with speedup switches run on their own copy of the net."""
    from detection.speedups import apply_variant

    rng = np.random.default_rng(seed)
    _, first_image, first_boxes = images[0]
    warm = torch.as_tensor(first_boxes[: min(len(first_boxes), 64)], dtype=torch.float32)
    conv_flops_of_shape: dict[tuple, int] = {}    # SPP conv FLOPs depend on the image size only
    out = {}
    for row in rows:
        row_net, row_settings = (apply_variant(net, settings, row.switches) if row.switches
                                 else (net, settings))
        if row_settings.batch_images > 1:
            out[row.name] = _batched_row(row_net, images, row, row_settings, device, progress)
            continue
        time_row(row_net, first_image, warm, row, row_settings, None, rng, device)
        per_region = None if row.switches else region_flops(net, first_image, row, settings)
        times, conv_flops, fc_flops = [], 0.0, 0.0
        for image_id, image, boxes in images:
            if progress:
                progress(f"{row.name}: {image_id}")
            box_tensor = torch.as_tensor(boxes, dtype=torch.float32)
            times.append(time_row(row_net, image, box_tensor, row, row_settings, rcnn_sample,
                                  rng, device))
            if per_region is None:
                continue
            n = len(boxes)
            fc_flops += n * per_region["fc"]
            if row.method == "spp":
                key = (row.scales, image.shape)
                if key not in conv_flops_of_shape:
                    conv_flops_of_shape[key] = count_flops(
                        lambda: conv_maps(net, image, row.scales, settings.max_side))  # noqa: B023
                conv_flops += conv_flops_of_shape[key]
            else:
                conv_flops += n * per_region["conv"]
        conv_time = sum(t["conv"] for t in times)
        fc_time = sum(t["fc"] for t in times)
        plain = per_region is not None
        out[row.name] = _row_summary(
            row, times,
            conv_gflops=conv_flops / len(images) / 1e9 if plain else None,
            fc_gflops=fc_flops / len(images) / 1e9 if plain else None,
            conv_gflops_per_s=conv_flops / 1e9 / conv_time if plain and conv_time else None,
            fc_gflops_per_s=fc_flops / 1e9 / fc_time if plain and fc_time else None,
            extrapolated_from=(rcnn_sample if row.method == "rcnn" and rcnn_sample
                               and any(rcnn_sample < len(b) for _, _, b in images) else None))
    regions = float(np.median([len(b) for _, _, b in images]))
    return {"rows": out, "regions_per_image": regions, "images": len(images)}


def _batched_row(net: DetectorNet, images, row: BenchRow, settings: ExtractSettings,
                 device: torch.device, progress: Callable[[str], None] | None) -> dict:
    """An SPP-net row whose conv layers run on groups of `settings.batch_images` images (the
    last group filled up by repeating images): per image, each stage's time over the group
    divided by its size; medians over the groups."""
    from detection.features import extract_batch

    group = settings.batch_images
    groups = [list(images[i:i + group]) for i in range(0, len(images), group)]
    groups = [(g * group)[:group] for g in groups]
    warm = groups[0]
    extract_batch(net, [im for _, im, _ in warm], [b[:64] for _, _, b in warm], settings)
    times = []
    for members in groups:
        if progress:
            progress(f"{row.name}: {', '.join(image_id for image_id, _, _ in members)}")
        timer = StageTimer(device)
        extract_batch(net, [im for _, im, _ in members], [b for _, _, b in members], settings,
                      timer)
        seconds = {k: v / len(members) for k, v in timer.seconds.items()}
        seconds["total"] = seconds["conv"] + seconds["pool"] + seconds["fc"]
        times.append(seconds)
    return _row_summary(row, times, images_per_batch=group)


def _row_summary(row: BenchRow, times: list[dict[str, float]], **extra: object) -> dict:
    """A row's JSON: median seconds per stage over `times`, FLOP figures (None unless given),
    and `extra`."""
    med = {k: float(statistics.median(t[k] for t in times))
           for k in ("conv", "pool", "fc", "total")}
    return {"method": row.method, "scales": list(row.scales), "switches": list(row.switches),
            "conv_s": med["conv"], "pool_s": med["pool"], "fc_s": med["fc"],
            "total_s": med["total"], "conv_gflops": None, "fc_gflops": None,
            "conv_gflops_per_s": None, "fc_gflops_per_s": None, "extrapolated_from": None,
            **extra}


def format_table(result: dict, paper: bool = True) -> str:
    """The paper's table: per row conv, pool, fc, total seconds and the speedup over R-CNN (the
    plain one); variant rows also show their mAP change on the demo set when measured."""
    rows = result["rows"]
    variants = result.get("variants") or {}
    rcnn_total = next((r["total_s"] for r in rows.values() if r["method"] == "rcnn"), None)
    width = max(18, *(len(name) for name in rows))
    lines = [f"{'method':<{width}} {'conv s':>8} {'pool s':>8} {'fc s':>8} {'total s':>9} "
             f"{'speedup':>8} {'conv GF/s':>9} {'fc GF/s':>8} {'mAP delta':>9}"]

    def rate(value: float | None) -> str:
        return f"{value:.1f}" if value is not None else "-"

    for name, r in rows.items():
        speed = f"{rcnn_total / r['total_s']:.1f}x" if rcnn_total and r["total_s"] else "-"
        note = f"  (R-CNN timed on {r['extrapolated_from']} regions per image, scaled up)" \
            if r["extrapolated_from"] else ""
        delta = variants.get("+".join(r.get("switches") or ()), {}).get("mAP_delta")
        delta_text = f"{delta:+.3f}" if delta is not None else "-"
        lines.append(f"{name:<{width}} {r['conv_s']:>8.3f} {r['pool_s']:>8.3f} {r['fc_s']:>8.3f} "
                     f"{r['total_s']:>9.3f} {speed:>8} {rate(r['conv_gflops_per_s']):>9} "
                     f"{rate(r['fc_gflops_per_s']):>8} {delta_text:>9}{note}")
    if paper:
        lines.append("paper (ZF-5, GPU): SPP-net 1-scale 0.053 + 0.089 = 0.142 s, "
                     "R-CNN 8.96 + 0.07 = 9.03 s, 64x")
    return "\n".join(lines)


def bench_split(dataset, preset, workdir, device: torch.device, images: int,
                rcnn_sample: int | None = None, multiscale: bool = True,
                weights: str | None = None, jobs: int | None = None,
                progress: Callable[[str], None] | None = None,
                spp_scales: tuple[int, ...] | None = None,
                variants: Sequence[str] | None = None,
                map_workdir: str | Path | None = None) -> dict:
    """`sppnet bench` on the first `images` images of a split: their cached proposals, a net of
    the preset (timing does not depend on the weights' values), every row timed. `spp_scales`
    replaces the preset's single scale in the first SPP-net row (the `spp` entry). `variants`
    (speedup names, or `["auto"]`) adds SPP-net rows with speedups, each against the plain
    R-CNN; with `map_workdir` (where `sppnet demo` ran) each variant's mAP is also measured on
    the demo's test split. Returns the JSON summary."""
    import sys

    from data.errors import SppnetError
    from detection.backbones import build_net
    from detection.pipeline import dataset_proposals

    if not dataset.images:
        raise SppnetError(f"{dataset.root}: split {dataset.split!r} lists no images")
    dataset.images = dataset.images[:images]
    boxes, run = dataset_proposals(dataset, workdir, preset.max_proposals, jobs,
                                   progress=progress is not None)
    loaded = [(im.image_id, im.load(), boxes[im.image_id])
              for im in dataset.images if im.image_id in boxes]
    if not loaded:
        raise SppnetError("no image of the split could be read")
    net = build_net(preset.backbone, weights, crop_size=preset.crop_size).to(device).eval()
    first = tuple(spp_scales or preset.scales())
    first_name = "SPP-net 1-scale" if len(first) == 1 else f"SPP-net {len(first)}-scale"
    rows = [BenchRow(first_name, "spp", first)]
    multi_scales = preset.scales(multi=True)
    multi_name = f"SPP-net {len(multi_scales)}-scale"
    if multiscale and first != multi_scales:
        rows.append(BenchRow(multi_name, "spp", multi_scales))
    rows.append(BenchRow("R-CNN", "rcnn", (preset.scale,)))
    settings = ExtractSettings(max_side=preset.max_side)
    if progress:
        print(f"timing {len(loaded)} images of {dataset.name}/{dataset.split}, {preset.name} "
              f"preset ({preset.backbone}), on {device_description(device)}", file=sys.stderr)
    with strict_fp32():
        result = run_bench(net, loaded, rows, settings, device, rcnn_sample, progress=progress)
        table = result["rows"]
        spp, rcnn = table[first_name], table["R-CNN"]
        fp32_rate = matmul_gflops(device)
        extra = {}
        if variants:
            extra = bench_variants(net, loaded, first, settings, device, table, variants,
                                   fp32_rate, progress)
        if map_workdir is not None:
            deltas = variant_map_deltas(map_workdir, list(extra["variants"]), device, progress)
            for name, row in extra["variants"].items():
                row["mAP_delta"] = deltas[row.get("switches", name)]
    timed = {i[0] for i in loaded}
    ss = [r.seconds for r in run.results if r.key in timed]
    multi = table.get(multi_name) if first_name != multi_name else None
    return {
        "spp": spp, "spp_multiscale": multi, "rcnn": rcnn,
        "speedup": rcnn["total_s"] / spp["total_s"],
        "speedup_multiscale": rcnn["total_s"] / multi["total_s"] if multi else None,
        "matmul_gflops_per_s": fp32_rate,
        "selective_search_s": float(np.median(ss)) if ss else None,
        "regions_per_image": result["regions_per_image"], "images": result["images"],
        "preset": preset.name, "backbone": preset.backbone,
        "device": device_description(device), "threads": torch.get_num_threads(),
        "precision": "fp32, TF32 off",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rows": table,
        **extra,
    }


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_GAIN = 1.2      # a precision is tried when its matmul is this much faster than fp32's


def precision_rates(device: torch.device) -> dict[str, float]:
    """Matmul GFLOP/s of fp32, bf16 and fp16 on `device` at one size (1024), to decide which
    lower precisions the device gains from (many CPUs emulate bf16/fp16 slowly)."""
    rates = {"fp32": matmul_gflops(device, torch.float32, n=1024, repeats=3)}
    for name, dtype in PRECISION_DTYPES.items():
        try:
            rates[name] = matmul_gflops(device, dtype, n=1024, repeats=3)
        except RuntimeError:        # not supported on this device
            rates[name] = 0.0
    return rates


def auto_variants(rates: dict[str, float], int8: bool = False) -> tuple[list[str], dict[str, str]]:
    """The single switches worth timing on a device with these matmul rates (and `int8` where
    it can run), and why each precision left out was left out."""
    singles = ["dedup", "svd", "channels_last", "batch"] + (["int8"] if int8 else [])
    skipped = {} if int8 else {"int8": "int8 fc layers run on a CPU only"}
    for name in PRECISION_DTYPES:
        if rates[name] >= PRECISION_GAIN * rates["fp32"]:
            singles.append(name)
        else:
            skipped[name] = (f"{name} matmul {rates[name]:.0f} GFLOP/s is not faster than fp32's "
                             f"{rates['fp32']:.0f} on this device")
    return singles, skipped


def bench_variants(net: DetectorNet, images, scales: tuple[int, ...], settings: ExtractSettings,
                   device: torch.device, table: dict, variants: Sequence[str],
                   fp32_rate: float, progress: Callable[[str], None] | None = None) -> dict:
    """Time SPP-net at `scales` with speedups, each against the plain R-CNN row of `table`.
    `["auto"]` times every single switch the device gains from and the switches that each made
    SPP-net faster together; `best` is then the fastest of those rows. Rows are added to
    `table`."""
    from detection.speedups import parse_variant

    plain_name = next(n for n, r in table.items() if r["method"] == "spp" and not r["switches"])
    rcnn_total = table["R-CNN"]["total_s"]
    skipped: dict[str, str] = {}
    rates = None
    if list(variants) == ["auto"]:
        from detection.speedups import int8_available

        rates = precision_rates(device)
        names, skipped = auto_variants(rates, int8_available(device))
    else:
        names = list(variants)
    out = {}

    def timed(name: str) -> None:
        switches = parse_variant(name)
        row = BenchRow(f"SPP-net +{name}", "spp", scales, switches)
        result = run_bench(net, images, [row], settings, device, progress=progress)["rows"]
        table.update(result)
        r = result[row.name]
        out[name] = {"conv_s": r["conv_s"], "pool_s": r["pool_s"], "fc_s": r["fc_s"],
                     "total_s": r["total_s"], "speedup": rcnn_total / r["total_s"],
                     "mAP_delta": None}

    for name in names:
        timed(name)
    if list(variants) == ["auto"]:
        plain_total = table[plain_name]["total_s"]
        gained = [n for n in names if out[n]["total_s"] < plain_total]
        precisions = [n for n in gained if n in (*PRECISION_DTYPES, "int8")]
        best = [n for n in gained if n not in precisions]
        if precisions:
            best.append(min(precisions, key=lambda n: out[n]["total_s"]))
        if len(best) > 1:
            timed("+".join(best))
        fastest = min(out, key=lambda n: out[n]["total_s"])
        out["best"] = dict(out[fastest], switches=fastest)
    return {"variants": out, "variants_skipped": skipped, "precision_matmul_gflops_per_s": rates}


def variant_map_deltas(workdir: str | Path, variants: Sequence[str], device: torch.device,
                       progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """mAP of the SPP-net model that `sppnet demo` trained in `workdir` on the demo's test split
    with each variant's switches, minus its plain mAP (fractions); one pass per image, without
    the mirror image's, and no box voting, as the variants are timed and as the papers."""
    from data.errors import SppnetError
    from data.voc import open_voc
    from detection.model import load_detector
    from detection.pipeline import evaluate_detector, model_path
    from detection.presets import get_preset
    from detection.speedups import parse_variant, variant_detector

    workdir = Path(workdir)
    root = workdir / "demo-data"
    if not (root / "demo.json").is_file():
        raise SppnetError(f"{workdir}: no demo dataset here (run `sppnet demo --workdir "
                          f"{workdir}` first)")
    trainval = open_voc(root, "trainval")
    test = open_voc(root, "test", trainval.classes)
    path = model_path(workdir, trainval.name, get_preset("small"), "spp")
    if not path.is_file():
        raise SppnetError(f"{path}: no trained demo SPP-net model (run `sppnet demo --workdir "
                          f"{workdir}` first)")
    detector = load_detector(path, device)
    detector.test_mirror = False      # one pass, as the variants are timed, and as the papers
    detector.box_voting = False
    out_root = workdir / "bench-variants"

    def mean_ap(name: str, det) -> float:
        if progress:
            progress(f"mAP on {test.name}/test: {name}")
        return evaluate_detector(det, test, workdir, out_root / name.replace("+", "_"),
                                 examples=0, quiet=True)["mAP"]

    plain = mean_ap("plain", detector)
    deltas = {}
    for name in variants:
        if name != "best":          # `best` is a copy of the row of its switches
            deltas[name] = mean_ap(name, variant_detector(detector, parse_variant(name))) - plain
    return deltas


def format_summary(summary: dict) -> str:
    """The table and the lines under it, as `sppnet bench` prints them."""
    lines = [format_table(summary)]
    if summary["selective_search_s"] is not None:
        lines.append(f"selective search (CPU, outside the table): "
                     f"{summary['selective_search_s']:.2f} s per image (median)")
    lines.append(f"speedup (R-CNN total / first SPP-net row's total): {summary['speedup']:.1f}x; "
                 f"fp32 matmul {summary['matmul_gflops_per_s']:.0f} GFLOP/s; "
                 f"{summary['regions_per_image']:.0f} regions per image; {summary['device']}; "
                 f"torch {summary['versions']['torch']}")
    if summary.get("variants"):
        best = summary["variants"].get("best")
        if best:
            lines.append(f"best speedups together ({best['switches']}): "
                         f"{best['speedup']:.1f}x over the plain R-CNN")
        for name, reason in (summary.get("variants_skipped") or {}).items():
            lines.append(f"{name} not timed: {reason}")
        lines.append("mAP delta: the variant's mAP on the demo test split minus plain SPP-net's"
                     if any(v["mAP_delta"] is not None for v in summary["variants"].values())
                     else "mAP delta not measured (give --map-workdir W, a workdir of "
                          "`sppnet demo`)")
    return "\n".join(lines)
