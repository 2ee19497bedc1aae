"""The bundled procedural demo dataset, written in PASCAL VOC layout.

Why: the project must be tryable with one command, on a CPU, without downloading anything. This
module draws a small detection dataset whose classes differ in *shape and texture* (never in
colour), on cluttered backgrounds with distractor shapes, so that a small CNN trained from scratch
can learn it while mAP stays well below 1.0.

Layout written under ``out`` (the same as VOCdevkit/VOC2007, so the VOC reader reads it as is)::

    Annotations/<id>.xml         standard VOC XML, 1-based integer boxes
    JPEGImages/<id>.jpg          RGB JPEG, quality 90, no metadata
    ImageSets/Main/trainval.txt  ids 000001 .. trainval
    ImageSets/Main/train.txt     trainval minus every 4th image
    ImageSets/Main/val.txt       every 4th trainval image (positions 3, 7, 11, ... counted from 0)
    ImageSets/Main/test.txt      the ids after trainval
    demo.json                    marker: generator parameters (lets a rerun overwrite safely)

Determinism: image ``i`` (1-based) is drawn only from ``numpy.random.default_rng([seed, i])``;
no global RNG, no timestamps, fixed JPEG quality and a fixed XML format. The same seed gives
byte-identical files (on the same library versions), another seed gives other images.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from data.atomic import atomic_write_bytes
from data.errors import FileError, SppnetError

# --------------------------------------------------------------------------------------------------
# Public constants

#: Object classes, sorted alphabetically. Each pairs one shape with one texture:
#: checker = square/rectangle with a checkerboard, cross = solid plus sign, disc = disc/ellipse
#: with a radial gradient, ring = annulus split into alternating angular segments,
#: star = five-pointed star with a dot grid, triangle = triangle with parallel stripes.
DEMO_CLASSES: tuple[str, ...] = ("checker", "cross", "disc", "ring", "star", "triangle")

#: Image sizes are drawn uniformly from these inclusive ranges (small: CPU-friendly).
WIDTH_RANGE: tuple[int, int] = (240, 360)
HEIGHT_RANGE: tuple[int, int] = (180, 280)
JPEG_QUALITY: int = 90

#: Object placement and the 'difficult' rule.
MIN_OBJECT_SIZE = 18.0  # px, the smallest drawn object diameter
MAX_OBJECT_FRACTION = 0.85  # largest object diameter, as a fraction of the shorter image side
MAX_OCCLUSION = 0.4  # a later object may hide at most this fraction of an earlier one
MIN_IN_IMAGE = 0.45  # a border-cut object keeps at least this fraction of its area inside
DIFFICULT_MIN_SIDE = 18  # visible box shorter side below this (px) -> difficult
DIFFICULT_MIN_VISIBLE = 0.5  # visible area / full shape area below this -> difficult
VAL_EVERY = 4  # every 4th trainval image goes to val

MARKER = "demo.json"
_FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------------------
# Geometry of one object


@dataclass(frozen=True)
class _Pose:
    """Where an object sits: centre (px), half extents along its own axes (px), rotation."""

    cx: float
    cy: float
    sx: float
    sy: float
    angle: float

    def to_image(self, uv: np.ndarray) -> np.ndarray:
        """Unit shape coordinates [N, 2] -> image coordinates [N, 2] (pixel centres at integers)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = uv[:, 0] * self.sx
        v = uv[:, 1] * self.sy
        return np.stack([self.cx + u * c - v * s, self.cy + u * s + v * c], axis=1)

    def local(self, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit shape coordinates (u, v), each [h, w], of the pixels of an image patch."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx = np.arange(x0, x0 + w, dtype=np.float32)[None, :] - np.float32(self.cx)
        dy = np.arange(y0, y0 + h, dtype=np.float32)[:, None] - np.float32(self.cy)
        u = (dx * np.float32(c) + dy * np.float32(s)) / np.float32(self.sx)
        v = (dy * np.float32(c) - dx * np.float32(s)) / np.float32(self.sy)
        return u, v


def _circle(radius: float, n: int = 72) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1) * radius


def _polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a simple polygon [N, 2] (px^2)."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _soft_square(z: np.ndarray, period_px: float) -> np.ndarray:
    """A sine wave of the given period (px) pushed to an anti-aliased square wave, in [0, 1].

    The ramp between the two levels is about 1.5 px wide whatever the period, so that big
    objects get crisp two-colour patterns and tiny ones a smooth, alias-free blur.
    """
    sharp = np.float32(max(1.5, period_px / (1.5 * math.pi)))
    return np.clip(z * sharp, -1.0, 1.0) * np.float32(0.5) + np.float32(0.5)


# One class = (shape in unit coordinates, texture as a blend weight field in [0, 1]).
# A shape returns (filled polygons, hole polygons) with extent about [-1, 1]^2; a texture maps the
# unit coordinates (u, v) of a patch and the pixels per unit length to the weight of the second
# colour.
_Shape = tuple[list[np.ndarray], list[np.ndarray]]
_Texture = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _checker(rng: np.random.Generator) -> tuple[_Shape, _Texture, float]:
    square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    k = float(rng.integers(3, 6))  # cells per side
    f = np.float32(math.pi * k / 2)

    def texture(u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
        return _soft_square(np.sin(f * (u + 1)) * np.sin(f * (v + 1)), 4.0 / k * px)

    return ([square], []), texture, 1.3  # aspect jitter up to 1.3


def _cross(rng: np.random.Generator) -> tuple[_Shape, _Texture, float]:
    w = rng.uniform(0.22, 0.36)  # arm half width
    plus = np.array(
        [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
         [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]],
        dtype=np.float64,
    )
    tint = np.float32(rng.uniform(0.0, 0.15))  # solid: a barely visible second colour

    def texture(u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
        return np.full(u.shape, tint, dtype=np.float32)

    return ([plus], []), texture, 1.15


def _disc(rng: np.random.Generator) -> tuple[_Shape, _Texture, float]:
    hx, hy = rng.uniform(-0.35, 0.35, 2)  # highlight centre
    gamma = np.float32(rng.uniform(0.7, 1.6))
    norm = np.float32(1.0 + math.hypot(hx, hy))

    def texture(u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
        r = np.sqrt((u - np.float32(hx)) ** 2 + (v - np.float32(hy)) ** 2) / norm
        return np.clip(r, 0.0, 1.0) ** gamma

    return ([_circle(1.0)], []), texture, 1.25


def _ring(rng: np.random.Generator) -> tuple[_Shape, _Texture, float]:
    inner = rng.uniform(0.45, 0.65)
    half_segments = float(rng.integers(2, 5))  # 4, 6 or 8 alternating segments
    phase = np.float32(rng.uniform(0, 2 * math.pi))

    def texture(u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
        period_px = 2 * math.pi * 0.8 / half_segments * px  # measured along the ring's middle
        z = np.sin(np.arctan2(v, u) * np.float32(half_segments) + phase)
        return _soft_square(z, period_px)

    return ([_circle(1.0)], [_circle(inner)]), texture, 1.12


def _star(rng: np.random.Generator) -> tuple[_Shape, _Texture, float]:
    inner = rng.uniform(0.38, 0.52)
    t = np.arange(10) * (math.pi / 5) - math.pi / 2
    r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    star = np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)
    spacing = np.float32(2.0 / rng.uniform(4.0, 6.5))
    off = rng.uniform(0, 1, 2).astype(np.float32)
    dot = np.float32(rng.uniform(0.26, 0.36))  # dot radius / spacing

    def texture(u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
        fu = np.mod(u / spacing + off[0], 1.0) - np.float32(0.5)
        fv = np.mod(v / spacing + off[1], 1.0) - np.float32(0.5)
        d = np.sqrt(fu * fu + fv * fv)
        edge = np.float32(max(4.0, float(spacing) * px))  # 1 px ramp at the dot's rim
        return np.clip((dot - d) * edge + np.float32(0.5), 0.0, 1.0)

    return ([star], []), texture, 1.12


def _triangle(rng: np.random.Generator) -> tuple[_Shape, _Texture, float]:
    t = np.array([-90.0, 30.0, 150.0]) * (math.pi / 180)
    tri = np.stack([np.cos(t), np.sin(t)], axis=1) + rng.uniform(-0.12, 0.12, (3, 2))
    tri[:, 1] += 0.25  # centre the bounding box (the circumscribed triangle sits high)
    freq = np.float32(math.pi * rng.uniform(2.2, 4.0))  # stripe periods across the unit extent 2
    phi = rng.uniform(0, math.pi)
    cu, su = np.float32(math.cos(phi)), np.float32(math.sin(phi))
    phase = np.float32(rng.uniform(0, 2 * math.pi))

    def texture(u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
        return _soft_square(np.sin((u * cu + v * su) * freq + phase), 2 * math.pi / freq * px)

    return ([tri], []), texture, 1.3


_CLASS_MAKERS = {
    "checker": _checker,
    "cross": _cross,
    "disc": _disc,
    "ring": _ring,
    "star": _star,
    "triangle": _triangle,
}
assert tuple(sorted(_CLASS_MAKERS)) == DEMO_CLASSES

# --------------------------------------------------------------------------------------------------
# Rasterisation and compositing


def _raster(polys: list[np.ndarray], holes: list[np.ndarray], w: int, h: int):
    """Anti-aliased coverage of polygons (image px coordinates) inside a w x h image.

    Returns (alpha [ph, pw] float32 in [0, 1], x0, y0) for the patch that holds the shape, or None
    when the shape lies outside the image.
    """
    pts = np.concatenate(polys)
    x0 = max(int(math.floor(pts[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(pts[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + 2, w)
    y1 = min(int(math.ceil(pts[:, 1].max())) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return None
    mask = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    off = np.array([x0, y0], dtype=np.float64)

    def fixed(p: np.ndarray) -> np.ndarray:  # 4 fractional bits, as cv2's `shift=4`
        return np.round((p - off) * 16.0).astype(np.int32)

    cv2.fillPoly(mask, [fixed(p) for p in polys], 255, cv2.LINE_AA, 4)
    if holes:
        cv2.fillPoly(mask, [fixed(p) for p in holes], 0, cv2.LINE_AA, 4)
    return mask.astype(np.float32) * np.float32(1.0 / 255.0), x0, y0


def _blend(canvas: np.ndarray, alpha: np.ndarray, x0: int, y0: int, paint: np.ndarray) -> None:
    """canvas[patch] = (1 - alpha) * canvas[patch] + alpha * paint; paint is [3] or [ph, pw, 3]."""
    h, w = alpha.shape
    region = canvas[y0 : y0 + h, x0 : x0 + w]
    a = alpha[:, :, None]
    region += a * (paint - region)


def _blend_mask(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, opacity: float) -> None:
    """Blend a full-size uint8 mask (drawn with cv2) in one colour, on its bounding box only."""
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return
    alpha = mask[y : y + h, x : x + w].astype(np.float32) * np.float32(opacity / 255.0)
    _blend(canvas, alpha, x, y, colour.astype(np.float32))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(15, 240, 3).astype(np.float32)


def _colour_pair(rng: np.random.Generator, min_diff: float = 70.0) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours that differ enough for a texture to be visible."""
    c1 = _random_colour(rng)
    for _ in range(20):
        c2 = _random_colour(rng)
        if float(np.abs(c1 - c2).mean()) >= min_diff:
            break
    else:
        c2 = (255.0 - c1).astype(np.float32)
    return c1, c2


# --------------------------------------------------------------------------------------------------
# Background and distractors (none of them is one of the classes)

_TEXT_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789abdefghkmnpqrstuwxyz"
_FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A linear colour gradient plus low-frequency colour noise, float32 [h, w, 3]."""
    ang = rng.uniform(0, 2 * math.pi)
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    t = xs * np.float32(math.cos(ang)) + ys * np.float32(math.sin(ang))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    img = c0 + (c1 - c0) * t[:, :, None]
    gh, gw = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    grid = rng.normal(0, 1, (gh, gw, 3)).astype(np.float32)
    img += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC) * np.float32(rng.uniform(8, 28))
    return img.astype(np.float32)


def _local_colour(canvas: np.ndarray, x: float, y: float, rng: np.random.Generator) -> np.ndarray:
    """A colour close to the background at (x, y): low-contrast clutter."""
    h, w = canvas.shape[:2]
    base = canvas[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)]
    return np.clip(base + rng.normal(0, 1, 3) * rng.uniform(8, 24), 0, 255).astype(np.float32)


def _clutter(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Low-contrast blobs and rectangles, long lines, then high-contrast distractors.

    Distractors are elongated ellipses, irregular (mostly non-convex) polygons, scribbles and
    text-like strokes: flat or speckled, never with a class texture.
    """
    h, w = canvas.shape[:2]
    side = min(w, h)
    mask = np.zeros((h, w), dtype=np.uint8)

    # low-contrast blobs (ellipses) and rotated rectangles
    for _ in range(int(rng.integers(3, 9))):
        mask[:] = 0
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        a, b = rng.uniform(0.05, 0.35, 2) * side
        if rng.random() < 0.5:
            cv2.ellipse(mask, (int(cx), int(cy)), (int(a), int(b)), float(rng.uniform(0, 180)),
                        0, 360, 255, -1, cv2.LINE_AA)
        else:
            box = cv2.boxPoints(((cx, cy), (2 * a, 2 * b), float(rng.uniform(0, 90))))
            cv2.fillPoly(mask, [np.round(box * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        _blend_mask(canvas, mask, _local_colour(canvas, cx, cy, rng), rng.uniform(0.5, 1.0))

    # long straight lines
    for _ in range(int(rng.integers(0, 4))):
        mask[:] = 0
        p = rng.uniform([-0.2 * w, -0.2 * h], [1.2 * w, 1.2 * h], (2, 2))
        cv2.line(mask, (int(p[0, 0]), int(p[0, 1])), (int(p[1, 0]), int(p[1, 1])), 255,
                 int(rng.integers(1, 4)), cv2.LINE_AA)
        if rng.random() < 0.5:
            colour = _local_colour(canvas, *p.mean(0), rng)
        else:
            colour = _random_colour(rng)
        _blend_mask(canvas, mask, colour, rng.uniform(0.4, 1.0))

    # distractor shapes
    for _ in range(int(rng.integers(2, 8))):
        mask[:] = 0
        kind = int(rng.integers(0, 4))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        size = math.exp(rng.uniform(math.log(12), math.log(0.5 * side)))
        if kind == 0:  # elongated ellipse (a disc is never this elongated, nor flat-coloured)
            a = size / 2
            b = a / rng.uniform(2.0, 4.5)
            cv2.ellipse(mask, (int(cx), int(cy)), (max(int(a), 2), max(int(b), 1)),
                        float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        elif kind == 1:  # irregular polygon
            n = int(rng.integers(5, 10))
            t = np.sort(rng.uniform(0, 2 * math.pi, n))
            r = rng.uniform(0.3, 1.0, n) * size / 2
            poly = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
            cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        elif kind == 2:  # scribble: a smoothed random walk
            n = int(rng.integers(6, 20))
            steps = rng.normal(0, 1, (n, 2)).cumsum(0) * (size / 6)
            pts = np.round((steps + [cx, cy]) * 16).astype(np.int32)
            cv2.polylines(mask, [pts], False, 255, int(rng.integers(1, 4)), cv2.LINE_AA, 4)
        else:  # text-like strokes
            text = "".join(rng.choice(list(_TEXT_CHARS), int(rng.integers(2, 9))))
            font = _FONTS[int(rng.integers(len(_FONTS)))]
            cv2.putText(mask, text, (int(cx - size), int(cy)), font, float(rng.uniform(0.4, 1.3)),
                        255, int(rng.integers(1, 3)), cv2.LINE_AA)
        x, y, bw, bh = cv2.boundingRect(mask)
        if bw == 0 or bh == 0:
            continue
        colour = _random_colour(rng)
        alpha = mask[y : y + bh, x : x + bw].astype(np.float32) * np.float32(1 / 255)
        if kind in (0, 1) and rng.random() < 0.5:  # speckled fill
            speckle = rng.normal(0, rng.uniform(10, 30), (bh, bw, 1)).astype(np.float32)
            _blend(canvas, alpha, x, y, colour + speckle)
        else:
            _blend(canvas, alpha * np.float32(rng.uniform(0.6, 1.0)), x, y, colour)


# --------------------------------------------------------------------------------------------------
# Objects


@dataclass
class _Placed:
    name: str
    vis: np.ndarray  # [h, w] float32: visible coverage in the final image
    area: float  # area of the whole (unclipped) shape, px^2
    in_image: float  # coverage inside the image when drawn, px^2 (the occlusion budget's base)
    truncated: bool


def _try_object(canvas: np.ndarray, placed: list[_Placed], name: str, size: float,
                allow_cut: bool, rng: np.random.Generator) -> _Placed | None:
    """Draw one object of class `name` if its placement respects the border and occlusion limits."""
    h, w = canvas.shape[:2]
    (polys, holes), texture, max_aspect = _CLASS_MAKERS[name](rng)
    aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
    half = size / 2
    angle = rng.uniform(0, 2 * math.pi)
    if allow_cut:  # the centre may lie a little outside: the border cuts the object
        cx = rng.uniform(-0.25 * size, w - 1 + 0.25 * size)
        cy = rng.uniform(-0.25 * size, h - 1 + 0.25 * size)
    else:
        cx = rng.uniform(min(half, (w - 1) / 2), max(w - 1 - half, (w - 1) / 2))
        cy = rng.uniform(min(half, (h - 1) / 2), max(h - 1 - half, (h - 1) / 2))
    pose = _Pose(cx, cy, half * aspect, half / aspect, angle)
    polys_px = [pose.to_image(p) for p in polys]
    holes_px = [pose.to_image(p) for p in holes]
    c1, c2 = _colour_pair(rng)
    shade_amp = np.float32(rng.uniform(0.0, 0.2))
    shade_dir = rng.uniform(0, 2 * math.pi)

    area = sum(_polygon_area(p) for p in polys_px) - sum(_polygon_area(p) for p in holes_px)
    raster = _raster(polys_px, holes_px, w, h)
    if raster is None or area <= 0:
        return None
    alpha, x0, y0 = raster
    ph, pw = alpha.shape
    in_image = float(alpha.sum())
    if in_image < MIN_IN_IMAGE * area:
        return None
    for other in placed:  # would this object hide too much of an earlier one?
        lost = float((other.vis[y0 : y0 + ph, x0 : x0 + pw] * alpha).sum())
        if lost > 0 and float(other.vis.sum()) - lost < (1 - MAX_OCCLUSION) * other.in_image:
            return None

    u, v = pose.local(x0, y0, pw, ph)
    t = texture(u, v, min(pose.sx, pose.sy))[:, :, None]
    cs, sn = np.float32(math.cos(shade_dir)), np.float32(math.sin(shade_dir))
    shade = 1 + shade_amp * (u * cs + v * sn)  # soft directional lighting
    paint = (c1 + (c2 - c1) * t) * shade[:, :, None]
    _blend(canvas, alpha, x0, y0, paint)

    for other in placed:
        other.vis[y0 : y0 + ph, x0 : x0 + pw] *= 1 - alpha
    vis = np.zeros((h, w), dtype=np.float32)
    vis[y0 : y0 + ph, x0 : x0 + pw] = alpha
    pts = np.concatenate(polys_px)
    truncated = bool(pts[:, 0].min() < -0.5 or pts[:, 1].min() < -0.5
                     or pts[:, 0].max() > w - 0.5 or pts[:, 1].max() > h - 0.5)
    return _Placed(name, vis, area, in_image, truncated)


def _render(seed: int, index: int) -> tuple[np.ndarray, list[dict]]:
    """Draw image `index` (1-based): returns (uint8 RGB [h, w, 3], VOC object dicts)."""
    rng = np.random.default_rng([seed, index])
    w = int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1))
    h = int(rng.integers(HEIGHT_RANGE[0], HEIGHT_RANGE[1] + 1))
    canvas = _background(rng, w, h)
    _clutter(canvas, rng)

    max_size = MAX_OBJECT_FRACTION * min(w, h)
    placed: list[_Placed] = []
    for _ in range(int(rng.integers(1, 6))):
        name = DEMO_CLASSES[int(rng.integers(len(DEMO_CLASSES)))]
        size = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(max_size)))
        allow_cut = rng.random() < 0.25
        for attempt in range(10 if placed else 40):  # the first object always finds a place
            obj = _try_object(canvas, placed, name, size, allow_cut and attempt < 5, rng)
            if obj is not None:
                placed.append(obj)
                break
            size = max(MIN_OBJECT_SIZE, size * 0.8)
        # an object that finds no place is simply left out (the image has fewer objects)

    # camera: mild blur, then sensor noise
    canvas = cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(0.4, 0.8)))
    canvas += rng.normal(0, rng.uniform(2, 6), canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    objects = []
    for obj in placed:
        mask = obj.vis >= 0.5
        cols = np.flatnonzero(mask.any(axis=0))
        rows = np.flatnonzero(mask.any(axis=1))
        if cols.size == 0:
            continue
        xmin, xmax = int(cols[0]) + 1, int(cols[-1]) + 1  # VOC: 1-based, inclusive
        ymin, ymax = int(rows[0]) + 1, int(rows[-1]) + 1
        visible = float(obj.vis.sum()) / obj.area
        short = min(xmax - xmin + 1, ymax - ymin + 1)
        difficult = short < DIFFICULT_MIN_SIDE or visible < DIFFICULT_MIN_VISIBLE
        objects.append({
            "name": obj.name,
            "truncated": int(obj.truncated),
            "difficult": int(difficult),
            "bbox": (xmin, ymin, xmax, ymax),
        })
    return image, objects


# --------------------------------------------------------------------------------------------------
# Files


def _annotation_xml(image_id: str, width: int, height: int, objects: list[dict]) -> bytes:
    """Standard VOC XML in a fixed format (tabs, fixed element order, trailing newline)."""
    lines = [
        "<annotation>",
        "\t<folder>demo</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj["bbox"]
        lines += [
            "\t<object>",
            f"\t\t<name>{obj['name']}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{obj['truncated']}</truncated>",
            f"\t\t<difficult>{obj['difficult']}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _jpeg_bytes(image: np.ndarray) -> bytes:
    """Baseline JPEG at a fixed quality and no EXIF or other metadata: same pixels, same bytes."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY,
                                            optimize=False, progressive=False)
    return buf.getvalue()


_NUMBERED = re.compile(r"^(\d{6})\.(xml|jpg)$")
_TEMP = re.compile(r"^\.(\d{6}\.(xml|jpg)|[a-z]+\.(txt|json))\.[^.]+\.tmp$")  # atomic_write's


def _prepare_root(root: Path, params: dict) -> None:
    """Create the layout; refuse a directory that holds some other (non-demo) VOC dataset."""
    if root.exists() and not root.is_dir():
        raise FileError(root, "exists and is not a directory")
    has_voc = any((root / d).exists() for d in ("Annotations", "JPEGImages", "ImageSets"))
    if has_voc and not (root / MARKER).is_file():
        raise FileError(root, f"holds a dataset that is not a sppnet demo dataset (no {MARKER}); "
                              "choose an empty or new directory")
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # an interrupted rerun must not leave old split files pointing at a mix of old and new images
    for split in ("trainval", "train", "val", "test"):
        (root / "ImageSets/Main" / f"{split}.txt").unlink(missing_ok=True)
    marker = json.dumps(params, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(root / MARKER, marker.encode())


def _remove_stale(root: Path, keep: set[str]) -> None:
    """Delete numbered files of an earlier, larger demo set and temp files of an interrupted run."""
    for d in (root, root / "Annotations", root / "JPEGImages", root / "ImageSets/Main"):
        for p in d.iterdir():
            m = _NUMBERED.match(p.name)
            stale = m is not None and m.group(1) not in keep and d != root
            if (stale or _TEMP.match(p.name)) and p.is_file():
                p.unlink(missing_ok=True)


def generate_demo_dataset(out: str | Path, seed: int = 0, trainval: int = 200,
                          test: int = 100) -> dict:
    """Draw the demo dataset into `out` in VOC layout and return a small summary.

    `trainval` images get ids 000001..trainval, the `test` images the ids after them; val is every
    4th trainval image, train the rest. Rerunning into a directory that holds a demo dataset
    overwrites it (each file is written to a temporary name and renamed, so no final file is ever
    half written); a directory with another VOC dataset in it is refused.

    Returns {"root", "images", "objects", "classes" (objects per class), "difficult",
    "truncated", "seed", "seconds"}.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise SppnetError(f"demo seed must be a non-negative integer, got {seed!r}")
    if trainval < 0 or test < 0 or not 1 <= trainval + test <= 999_999:
        raise SppnetError(f"demo sizes must be trainval >= 0 and test >= 0 with 1 to 999999 images "
                          f"in all, got trainval={trainval}, test={test}")
    start = time.perf_counter()
    root = Path(out)
    seed, trainval, test = int(seed), int(trainval), int(test)
    params = {"generator": "sppnet data.demo", "version": _FORMAT_VERSION, "seed": seed,
              "trainval": trainval, "test": test, "classes": list(DEMO_CLASSES)}
    _prepare_root(root, params)

    ids = [f"{i:06d}" for i in range(1, trainval + test + 1)]
    _remove_stale(root, set(ids))
    counts = {name: 0 for name in DEMO_CLASSES}
    difficult = truncated = 0
    for index, image_id in enumerate(ids, start=1):
        image, objects = _render(seed, index)
        h, w = image.shape[:2]
        atomic_write_bytes(root / "JPEGImages" / f"{image_id}.jpg", _jpeg_bytes(image))
        atomic_write_bytes(root / "Annotations" / f"{image_id}.xml",
                           _annotation_xml(image_id, w, h, objects))
        for obj in objects:
            counts[obj["name"]] += 1
            difficult += obj["difficult"]
            truncated += obj["truncated"]

    tv = ids[:trainval]
    splits = {
        "trainval": tv,
        "train": [i for k, i in enumerate(tv) if k % VAL_EVERY != VAL_EVERY - 1],
        "val": [i for k, i in enumerate(tv) if k % VAL_EVERY == VAL_EVERY - 1],
        "test": ids[trainval:],
    }
    for split, split_ids in splits.items():  # written last: their presence means 'complete'
        atomic_write_bytes(root / "ImageSets/Main" / f"{split}.txt",
                           "".join(f"{i}\n" for i in split_ids).encode())
    return {
        "root": str(root),
        "images": len(ids),
        "objects": sum(counts.values()),
        "classes": counts,
        "difficult": difficult,
        "truncated": truncated,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 3),
    }
