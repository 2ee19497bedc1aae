"""What `sppnet eval` writes next to the VOC result files: a PNG of the precision/recall curves,
`report.md` (AP table, mAP, COCO AP, timing, links to the images) and annotated example images.

Every file is written atomically (`data.atomic`): a reader never sees half an image or report.
The plots use matplotlib's object-oriented `Figure` with the Agg canvas: no pyplot state, no
display, and no change to the process's matplotlib backend.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from data.atomic import atomic_write_bytes, atomic_write_text

# Distinct colours (matplotlib's tab10 then the light half of tab20), as RGB.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
]

_IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def class_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour of 1-based class `label` (the palette repeats after 20 classes)."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def _percent(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * float(value):.1f}"


# ------------------------------------------------------------------------------ PR curves

def plot_pr_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   ap: Mapping[str, float | None], path: str | Path, title: str) -> Path:
    """Write one PNG with the precision/recall curve of every class; return `path`.

    `curves` is `{class: (recall, precision)}` as `detection.evaluate.evaluate_voc` returns them;
    `ap` gives the legend's `class (AP %)`. Classes with an empty curve (no ground truth, or no
    detections) are listed in the legend without a line; with no class at all the axes say so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(list(curves) + list(ap)))
    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.add_subplot(1, 1, 1)
    for i, name in enumerate(names):
        recall, precision = curves.get(name, (np.zeros(0), np.zeros(0)))
        recall = np.asarray(recall, dtype=np.float64).reshape(-1)
        precision = np.asarray(precision, dtype=np.float64).reshape(-1)
        value = _percent(ap.get(name))
        label = f"{name} ({value}{'' if value == '-' else '%'})"
        colour = tuple(c / 255 for c in PALETTE[i % len(PALETTE)])
        if len(recall) and len(recall) == len(precision):
            axes.plot(recall, precision, color=colour, linewidth=1.5, label=label,
                      drawstyle="steps-post")
        else:
            axes.plot([], [], color=colour, linewidth=1.5, linestyle=":", label=label)
    if not names:
        axes.text(0.5, 0.5, "no classes to plot", ha="center", va="center",
                  transform=axes.transAxes, color="grey")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if names:
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small",
                    title="class (AP)", ncol=1 if len(names) <= 25 else 2, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------ report.md

def _cell(text: Any) -> str:
    """A markdown table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _link_target(out_dir: Path, name: str) -> str:
    """A path for a markdown link from `out_dir/report.md`: relative, with '/' separators, in
    angle brackets when it has spaces or parentheses."""
    path = Path(name)
    if path.is_absolute():
        path = Path(os.path.relpath(path, out_dir))
    target = path.as_posix()
    return f"<{target}>" if any(c in target for c in " ()<>") else target


def _seconds_lines(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"- {_cell(k)}: {float(v):.3f} s per image" for k, v in value.items()
                if v is not None]
    return [f"- detection time: {float(value):.3f} s per image (median)"]


def write_report(out_dir: str | Path, summary: Mapping[str, Any], pr_png: str | None,
                 examples: Sequence[str]) -> Path:
    """Write `out_dir/report.md` (atomically) and return its path.

    `summary` holds `method`, `dataset`, `split`, `metric`, `mAP`, `ap` `{class: float | None}`
    (fractions), and optionally `scales`, `scorer`, `conv_fine_tuned`, `test_mirror`,
    `box_voting`, `images`, `coco` `{"AP", "AP50", "AP75"}`, `seconds_per_image` (a number, or
    `{stage: seconds}`).
    `pr_png` and `examples` are image files, relative to `out_dir` (absolute paths are made
    relative).
    """
    out_dir = Path(out_dir)
    method = summary.get("method", "detector")
    dataset = summary.get("dataset", "?")
    split = summary.get("split")
    where = f"{dataset}/{split}" if split else f"{dataset}"
    lines = [f"# {method} on {where}", ""]

    facts = []
    if summary.get("metric"):
        facts.append(f"- metric: {summary['metric']}")
    if summary.get("scales"):
        facts.append(f"- scales: {', '.join(str(s) for s in summary['scales'])} px")
    if summary.get("warp_px"):
        facts.append(f"- regions warped to {summary['warp_px']}×{summary['warp_px']} px")
    if summary.get("scorer"):
        facts.append(f"- scorer: {summary['scorer']}")
    if summary.get("method") == "spp" and summary.get("conv_fine_tuned"):
        facts.append("- conv layers fine-tuned with fc6-fc8 on whole images (beyond the "
                     "SPP-net paper, which fine-tunes fc6-fc8 only)")
    if summary.get("test_mirror") is not None:
        facts.append("- each image also run flipped, the two passes averaged"
                     if summary["test_mirror"] else "- one pass per image (no mirror pass)")
    if summary.get("box_voting") is not None:
        facts.append("- box voting: each kept box moved to its cluster's score-weighted mean"
                     if summary["box_voting"] else "- no box voting (boxes as NMS kept them)")
    if summary.get("images") is not None:
        facts.append(f"- images: {summary['images']}")
    facts += _seconds_lines(summary.get("seconds_per_image"))
    if facts:
        lines += facts + [""]

    ap = summary.get("ap") or {}
    metric = summary.get("metric")
    lines += [f"## Average precision{f' ({metric})' if metric else ''}", "",
              "| class | AP (%) |", "|:--|--:|"]
    lines += [f"| {_cell(name)} | {_percent(value)} |" for name, value in ap.items()]
    lines += [f"| **mAP** | **{_percent(summary.get('mAP'))}** |", ""]
    if not ap:
        lines += ["No class has ground truth in this split.", ""]

    coco = summary.get("coco")
    if coco:
        lines += ["## COCO-style AP", "", "| AP | AP50 | AP75 |", "|--:|--:|--:|",
                  f"| {_percent(coco.get('AP'))} | {_percent(coco.get('AP50'))} | "
                  f"{_percent(coco.get('AP75'))} |", ""]

    if pr_png:
        lines += ["## Precision / recall", "", f"![precision/recall curves]"
                  f"({_link_target(out_dir, pr_png)})", ""]
    if examples:
        lines += ["## Examples", ""]
        for name in examples:
            lines += [f"![{_cell(Path(name).name)}]({_link_target(out_dir, name)})", ""]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines).rstrip("\n") + "\n")


# ------------------------------------------------------------------------------ examples

def _as_array(values: Any, dtype: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)   # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def draw_detections(image: np.ndarray, boxes: Any, labels: Any, scores: Any,
                    class_names: Sequence[str], path: str | Path) -> Path:
    """Write an annotated copy of `image` (`[H, W, 3]` uint8 RGB) to `path`; return `path`.

    `boxes` `[M, 4]` are 0-based pixel-inclusive xyxy, `labels` `[M]` 1-based indices into
    `class_names` (the K class names, background excluded), `scores` `[M]`. Each box is drawn in
    its class's colour with "class score" on a filled label; higher scores are drawn last (on
    top). The format follows the extension (.jpg, .jpeg, .png); the input array is not modified
    and nothing but `path` is written.
    """
    from PIL import Image, ImageDraw

    path = Path(path)
    fmt = _IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported image extension, use one of "
                         f"{', '.join(_IMAGE_FORMATS)}")
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"image must be [H, W, 3], got shape {pixels.shape}")
    canvas = Image.fromarray(np.ascontiguousarray(pixels[:, :, :3], dtype=np.uint8), "RGB")
    width, height = canvas.size
    boxes = _as_array(boxes, np.float64).reshape(-1, 4)
    labels = _as_array(labels, np.int64).reshape(-1)
    scores = _as_array(scores, np.float64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels, {len(scores)} scores")

    short = min(width, height)
    line = max(1, round(short / 250))
    font = _font(max(10, min(22, round(short / 28))))
    draw = ImageDraw.Draw(canvas)
    for i in np.argsort(scores, kind="stable"):
        x1, y1, x2, y2 = boxes[i]
        if not np.all(np.isfinite(boxes[i])):
            continue
        x1, x2 = (min(max(v, 0.0), width - 1.0) for v in (x1, x2))
        y1, y2 = (min(max(v, 0.0), height - 1.0) for v in (y1, y2))
        if x2 < x1 or y2 < y1:
            continue
        label = int(labels[i])
        colour = class_colour(label)
        name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 2
        # Above the box when it fits, else inside its top edge; kept inside the image.
        ty = y1 - th if y1 - th >= 0 else min(y1, max(height - th, 0))
        tx = min(x1, max(width - tw, 0))
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 2 - left, ty + 1 - top), text, font=font,
                  fill=(0, 0, 0) if luminance > 150 else (255, 255, 255))
    buffer = io.BytesIO()
    canvas.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return atomic_write_bytes(path, buffer.getvalue())
