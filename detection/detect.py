"""`sppnet detect DIR --out OUT`: a trained detector on every image under a folder.

What it reads
- Every file under DIR, recursively, in sorted order (by its path relative to DIR, `/`-separated).
  A file is an image when Pillow recognises its *content* (`data.images.is_image_file`), whatever
  its name: `photo.JPG`, `scan` (no extension) and `x.png` holding a JPEG are all images.
- A file that looks like an image but cannot be read is reported with its reason and skipped:
  "looks like an image" means its content is recognised, or its name has a common image
  extension (`IMAGE_EXTENSIONS`, any case), or it starts with the signature of a common format.
  Examples: an empty `a.jpg`, a truncated JPEG, text named `.jpg`, a decompression bomb, a
  folder named `x.jpg` (reported as "is a directory"; its content is still searched), an
  unreadable `.heic`. Every other file (`README.txt`, `.DS_Store`, ...) is ignored silently.
- Symbolic links are followed only when they resolve inside DIR, and only to files: a link to a
  folder is not descended (its target, inside DIR, is searched anyway; no loops, no
  duplicates of whole trees). A link leaving DIR, or a broken one, is reported when its name
  looks like an image, else ignored.
- DIR is only ever opened for reading: nothing is written, renamed or touched in it. OUT must not
  be DIR nor lie inside it (checked by file identity, so symlinks and case-insensitive names
  do not fool it), and DIR must not lie inside what `detect` writes in OUT.

What it writes, all in OUT (every file atomically: temporary file + rename)
- `detections.json`: a COCO-format document (what pycocotools' `COCO(path)` loads, and the
  detections in the COCO *results* format):
      {"info": {"description", "format", "model", "method", "scorer", "score_threshold",
                "test_mirror", "box_voting", "folder"},
       "images": [{"id", "file_name" (relative to DIR), "width", "height", "annotated"}],
       "categories": [{"id", "name"}],
       "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h], "area",
                        "iscrowd": 0, "score"}]}
  `images` lists every image that was read (ids 1..N in file order), also those with no
  detection; category ids are the detector's 1-based labels; `bbox` is in 0-based pixels with
  pixel-inclusive sizes (w = x2 - x1 + 1), as `detection.evaluate` writes COCO boxes;
  `json.load(f)["annotations"]` is a results list that `COCO.loadRes` accepts.
  `score_threshold` is the threshold applied (by default the confident cut, see below).
- `detections.csv`: one row per detection, header `file,class,score,x1,y1,x2,y2`; `file` is
  relative to DIR, the box is 0-based pixel-inclusive (x1, y1, x2, y2) in the image as loaded
  (EXIF orientation applied). UTF-8; a file name that is not valid UTF-8 is backslash-escaped.
- `annotated/<relative path>.jpg`: a copy of each image with the confident detections drawn
  (see `draw_threshold`). Names are made safe by `OutputNames`: unicode kept (NFC), no path can
  leave `annotated/`, characters that Windows or macOS refuse replaced by `_`, over-long names
  shortened, and collisions (also case-insensitive ones, and a file against a folder) solved
  with a `-2`, `-3`, ... suffix; `detections.json` gives each image's annotated copy.
- `.sppnet/`: what makes a run resumable: `records/<hash>.json`, one per finished image
  (written after its annotated copy), and the proposal cache. A rerun reuses an image's record
  when the file's bytes, the model file and the options are unchanged, and rebuilds
  `detections.json` and `detections.csv` from the records: a run killed at any moment resumes,
  and a complete rerun gives the same files.

Scores and thresholds: `--score-threshold T` keeps detections scoring above T; without it the
command keeps the confident ones (`CONFIDENT_SCORE`: an SVM margin above 0, a softmax probability
above 0.5). `detect_folder` called without a threshold uses the detector's own default (`Detector.detect`: every NMS survivor for SVM scores, 1e-3 for
softmax scores), which is what AP needs but means many low-scoring boxes per image. The annotated
copies draw only the detections above T, or without T the confident ones (an SVM margin above 0,
a softmax probability above 0.5).

Exit status: 0 when the run completes, even with skipped files; a one-line error (status 2) for
wrong arguments, when no model is found, or when no image under DIR could be read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import stat
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from data.errors import ImageLoadError, SppnetError
from detection.memory import release_now_and_then

__all__ = ["IMAGE_EXTENSIONS", "ImageFile", "SkippedFile", "FolderScan", "ImageRecord",
           "DetectRun", "OutputNames", "safe_component", "is_safe_output_name", "is_within",
           "check_folders", "find_model", "scan_folder", "load_records", "model_fingerprint",
           "detect_folder", "coco_document", "csv_text", "write_outputs", "summary_of",
           "run_detect_command"]

FORMAT = "sppnet-detect-1"
STATE_DIR = ".sppnet"          # in OUT: records and the proposal cache
ANNOTATED_DIR = "annotated"    # in OUT: the annotated copies
CHUNK = 256                    # images per proposals-then-detect round (bounds memory)

#: Extensions (lower case) of common image formats: a file with one of these that cannot be read
#: is reported; a file without one is an image only when its content is recognised.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".psd", ".jp2", ".j2k", ".jpx",
    ".avif", ".heic", ".heif", ".jxl", ".qoi", ".pcx", ".sgi",
})

# Unambiguous magic numbers of common formats (a file starting like one looks like an image).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00",
               b"MM\x00*")

#: The score above which a detection counts as confident, per scorer (for the annotated copies).
CONFIDENT_SCORE = {"svm": 0.0, "softmax": 0.5}


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class ImageFile:
    """An image to process: its path relative to DIR (`/`-separated) and a path to open."""

    rel: str
    path: Path


@dataclass(frozen=True)
class SkippedFile:
    """A file that looks like an image but could not be processed, and why (one line)."""

    rel: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """`{"file", "reason"}` for the summary JSON."""
        return {"file": self.rel, "reason": self.reason}


@dataclass
class FolderScan:
    """The images found under a folder and the files skipped while looking, both sorted."""

    images: list[ImageFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


@dataclass(frozen=True)
class ImageRecord:
    """The detections of one image, as stored in `OUT/.sppnet/records/` between runs.

    `detections` holds `{"label": 1-based class, "score", "box": [x1, y1, x2, y2]}` dicts
    (0-based pixel-inclusive), best score first; `annotated` is the copy's path relative to OUT.
    """

    file: str
    sha256: str
    fingerprint: str
    width: int
    height: int
    annotated: str
    detections: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the record."""
        return {"format": FORMAT, "file": self.file, "sha256": self.sha256,
                "fingerprint": self.fingerprint, "width": self.width, "height": self.height,
                "annotated": self.annotated, "detections": list(self.detections)}


@dataclass
class DetectRun:
    """What `detect_folder` did: records of the images read (file order), skipped files, how
    many records were reused from an earlier run, and the wall time."""

    records: list[ImageRecord]
    skipped: list[SkippedFile]
    reused: int
    computed: int
    seconds: float


# --------------------------------------------------------------------------------------------
# Paths: containment, the model, the folders


def is_within(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` (existing or not) is `folder` or lies inside it.

    Compared by file identity (device and inode) of each existing ancestor of `path` after
    resolving symlinks, so a symlinked, differently cased (case-insensitive file systems) or
    bind-mounted spelling of `folder` is recognised. False when `folder` does not exist.
    """
    try:
        target = os.stat(folder)
    except (OSError, ValueError):
        return False
    current = Path(os.path.realpath(path))
    for candidate in (current, *current.parents):
        try:
            st = os.stat(candidate)
        except (OSError, ValueError):
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


def check_folders(image_dir: str | Path, out_dir: str | Path,
                  json_path: str | Path | None = None) -> tuple[Path, Path]:
    """Check DIR, OUT and `--json` before anything is written; returns (DIR, OUT) as absolute
    paths. One-line `SppnetError`s: DIR missing or not a folder, OUT not a folder, OUT equal to
    or inside DIR, DIR inside what detect writes in OUT, `--json` inside DIR."""
    image_dir = Path(os.path.abspath(image_dir))
    out_dir = Path(os.path.abspath(out_dir))
    if not image_dir.exists():
        raise SppnetError(f"{image_dir}: no such folder")
    if not image_dir.is_dir():
        raise SppnetError(f"{image_dir}: not a folder (give the folder that holds the images)")
    if out_dir.exists() and not out_dir.is_dir():
        raise SppnetError(f"--out {out_dir}: exists and is not a folder")
    if is_within(out_dir, image_dir):
        raise SppnetError(f"--out {out_dir}: is {image_dir} or inside it; detect never writes "
                          "into the input folder, choose an output folder outside it")
    for managed in (out_dir / ANNOTATED_DIR, out_dir / STATE_DIR):
        if is_within(image_dir, managed) or is_within(managed, image_dir):
            raise SppnetError(f"{image_dir}: overlaps {managed} (a symbolic link?), which "
                              "detect writes; choose another --out")
    if json_path is not None and is_within(json_path, image_dir):
        raise SppnetError(f"--json {json_path}: inside {image_dir}; detect never writes into "
                          "the input folder")
    return image_dir, out_dir


def find_model(workdir: str | Path, method: str) -> Path:
    """The newest `WORKDIR/models/*/<method>.pt` (by modification time), or a one-line error
    that says how to get one."""
    candidates = []
    for path in Path(workdir, "models").glob(f"*/{method}.pt"):
        try:
            if path.is_file():
                candidates.append((path.stat().st_mtime, str(path), path))
        except OSError:
            continue
    if not candidates:
        raise SppnetError(f"no trained {method} model in {Path(workdir, 'models')}: train one "
                          f"with `sppnet train --method {method} --workdir {workdir} ...` or run "
                          f"`sppnet demo --workdir {workdir}`, or give --model PATH")
    return max(candidates)[2]


# --------------------------------------------------------------------------------------------
# Scanning DIR


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_image_signature(path: Path) -> bool:
    """Whether a regular file starts with the magic number of a common image format."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except (OSError, ValueError):
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(magic) for magic in _SIGNATURES)


def _classify_file(rel: str, path: Path, scan: FolderScan) -> None:
    """Add a regular file to `scan`: an image (content recognised), a skipped file (looks like
    an image but cannot be read, with `load_image`'s reason), or nothing."""
    from data.images import is_image_file, load_image

    if is_image_file(path):
        scan.images.append(ImageFile(rel, path))
        return
    if not (_has_image_extension(rel) or _has_image_signature(path)):
        return
    try:
        load_image(path)
    except ImageLoadError as exc:
        scan.skipped.append(SkippedFile(rel, exc.reason))
    else:  # readable after all (e.g. changed since the first look): an image
        scan.images.append(ImageFile(rel, path))


def _follow_link(rel: str, path: Path, root: Path, scan: FolderScan) -> Path | None:
    """The target of a symlink when it is a file inside `root`; else None (reported when the
    link's name looks like an image)."""
    looks = _has_image_extension(rel)
    target = Path(os.path.realpath(path))
    if not target.exists():
        if looks:
            scan.skipped.append(SkippedFile(rel, "broken symbolic link"))
        return None
    if not is_within(target, root):
        if looks:
            scan.skipped.append(SkippedFile(rel, "symbolic link to outside the folder: not "
                                                 "followed"))
        return None
    if target.is_dir():
        return None  # its target is inside root: searched there
    return target


def _entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda entry: entry.name)


def _resolve_entry(entry: os.DirEntry, rel: str, root: Path, scan: FolderScan
                   ) -> tuple[Path, int] | None:
    """(path to open, st_mode) of a folder entry, links to files inside `root` followed; None
    for what is not followed (other links) or cannot be accessed (reported when the name looks
    like an image)."""
    path = Path(entry.path)
    try:
        if entry.is_symlink():
            target = _follow_link(rel, path, root, scan)
            return None if target is None else (target, os.stat(target).st_mode)
        return path, entry.stat(follow_symlinks=False).st_mode
    except OSError as exc:
        if _has_image_extension(rel):
            scan.skipped.append(SkippedFile(rel, f"cannot access: {exc.strerror or exc}"))
        return None


def scan_folder(root: str | Path) -> FolderScan:
    """Every image under `root`, recursively, and the files that look like images but cannot be
    read; both sorted by relative path. Only reads (see the module docstring for the rules)."""
    root = Path(root)
    scan = FolderScan()
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = _entries(folder)
        except OSError as exc:
            scan.skipped.append(SkippedFile(prefix.rstrip("/") or ".",
                                            f"cannot list folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            rel = prefix + entry.name
            resolved = _resolve_entry(entry, rel, root, scan)
            if resolved is None:
                continue
            path, mode = resolved
            if stat.S_ISDIR(mode):
                if _has_image_extension(rel):
                    scan.skipped.append(SkippedFile(rel, "is a directory"))
                stack.append((path, rel + "/"))
            elif stat.S_ISREG(mode):
                _classify_file(rel, path, scan)
            elif _has_image_extension(rel):
                scan.skipped.append(SkippedFile(rel, "not a regular file"))
    scan.images.sort(key=lambda image: image.rel)
    scan.skipped.sort(key=lambda skipped: skipped.rel)
    return scan


# --------------------------------------------------------------------------------------------
# Safe output names

_UNSAFE = re.compile('[\x00-\x1f\x7f<>:"/\\\\|?*\ud800-\udfff]')
_WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                               *(f"LPT{i}" for i in range(1, 10))})
MAX_NAME_BYTES = 200  # per path component, in UTF-8 (file systems allow 255)


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


def safe_component(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """One path component that every common file system accepts and that stays where it is put.

    Unicode is kept (normalised to NFC); NUL and control characters, path separators, characters
    Windows refuses (`<>:"|?*`) and undecodable bytes become `_`; trailing dots and spaces are
    dropped (Windows drops them); "", "." and ".." become "_"; Windows device names (CON,
    NUL, COM1, ...) get a leading `_`; the result has at most `limit` UTF-8 bytes.
    Idempotent: `safe_component(safe_component(x)) == safe_component(x)`.
    """
    text = _UNSAFE.sub("_", unicodedata.normalize("NFC", name))
    text = _truncate_utf8(text, limit).rstrip(" .")
    if text.split(".")[0].upper() in _WINDOWS_RESERVED:
        text = _truncate_utf8("_" + text, limit).rstrip(" .")
    return text or "_"


def _annotated_stem(file_name: str) -> str:
    """The stem of an annotated copy's name: `a.jpg` -> `a`, `a.png` -> `a.png` (so that
    `a.jpg` and `a.png` do not meet), made safe and short enough for a suffix and `.jpg`."""
    base, ext = os.path.splitext(file_name)
    stem = base if ext.lower() in (".jpg", ".jpeg") and base else file_name
    return safe_component(stem, MAX_NAME_BYTES - 12)


def is_safe_output_name(name: str) -> bool:
    """Whether `name` (relative to `annotated/`, `/`-separated) is one that `OutputNames` could
    have given: every component safe, ending in `.jpg`, no `..`, not absolute."""
    parts = name.split("/")
    return (name.endswith(".jpg") and len(name) > 4
            and all(part == safe_component(part) for part in parts))


def _name_key(name: str) -> str:
    """Equal for two names that one file system may treat as the same file (case-insensitive
    and normalisation-insensitive comparison)."""
    return unicodedata.normalize("NFC", name).casefold()


class OutputNames:
    """Safe, unique relative paths (under `annotated/`) for the images of a folder.

    `reserve(name)` claims a name given in an earlier run (kept stable across runs);
    `assign(rel)` gives a new name to the image at `rel` (path relative to DIR): the same
    folders, each component made safe (`safe_component`), the file name ending in `.jpg`, and a
    `-2`, `-3`, ... suffix when the name is taken. Two names collide when they are equal after
    NFC normalisation and case folding, or when one is used as a file and the other needs it
    as a folder.
    """

    def __init__(self) -> None:
        self._kinds: dict[str, str] = {}             # name key -> "file" | "dir"
        self._folders: dict[str, str] = {"": ""}     # source folder rel -> output folder

    def _free(self, name: str) -> bool:
        if _name_key(name) in self._kinds:
            return False
        parts = name.split("/")
        return all(self._kinds.get(_name_key("/".join(parts[:i]))) != "file"
                   for i in range(1, len(parts)))

    def _claim(self, name: str) -> None:
        parts = name.split("/")
        for i in range(1, len(parts)):
            self._kinds.setdefault(_name_key("/".join(parts[:i])), "dir")
        self._kinds[_name_key(name)] = "file"

    def reserve(self, name: str) -> bool:
        """Claim `name` if it is safe and free; False otherwise (then `assign` a new one)."""
        if not is_safe_output_name(name) or not self._free(name):
            return False
        self._claim(name)
        return True

    def _folder(self, rel_folder: str) -> str:
        """The output folder of a source folder: its parent's, plus the safe name (suffixed
        when a file already has that name)."""
        if rel_folder in self._folders:
            return self._folders[rel_folder]
        parent, _, name = rel_folder.rpartition("/")
        out_parent = self._folder(parent)
        base = safe_component(name, MAX_NAME_BYTES - 8)
        for n in itertools.count(1):
            folder = "/".join(p for p in (out_parent, base if n == 1 else f"{base}-{n}") if p)
            if self._kinds.get(_name_key(folder)) != "file":
                break
        self._folders[rel_folder] = folder
        return folder

    def assign(self, rel: str) -> str:
        """A new safe, unique name for the image at `rel`, claimed at once."""
        rel_folder, _, file_name = rel.rpartition("/")
        folder = self._folder(rel_folder)
        stem = _annotated_stem(file_name)
        for n in itertools.count(1):
            leaf = f"{stem}.jpg" if n == 1 else f"{stem}-{n}.jpg"
            name = f"{folder}/{leaf}" if folder else leaf
            if self._free(name):
                self._claim(name)
                return name
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Records (resumability)


def _record_path(records_dir: Path, rel: str) -> Path:
    digest = hashlib.sha256(rel.encode("utf-8", errors="surrogateescape")).hexdigest()
    return records_dir / f"{digest[:32]}.json"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _parse_record(raw: bytes, classes: int) -> ImageRecord | None:
    """A record from its file's bytes; None when anything is off (it is then recomputed)."""
    try:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return None
        detections = tuple(data["detections"])
        for det in detections:
            if not (isinstance(det["label"], int) and 1 <= det["label"] <= classes
                    and _finite(det["score"]) and len(det["box"]) == 4
                    and all(_finite(v) for v in det["box"])):
                return None
        record = ImageRecord(str(data["file"]), str(data["sha256"]), str(data["fingerprint"]),
                             int(data["width"]), int(data["height"]), str(data["annotated"]),
                             detections)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    prefix = ANNOTATED_DIR + "/"
    if not (record.annotated.startswith(prefix)
            and is_safe_output_name(record.annotated[len(prefix):])):
        return None
    return record


def load_records(records_dir: Path, classes: int) -> dict[str, ImageRecord]:
    """Every valid record in `records_dir`, by relative file path."""
    records: dict[str, ImageRecord] = {}
    try:
        paths = sorted(records_dir.glob("*.json"))
    except OSError:
        return records
    for path in paths:
        try:
            record = _parse_record(path.read_bytes(), classes)
        except OSError:
            continue
        if record is not None and _record_path(records_dir, record.file) == path:
            records[record.file] = record
    return records


def model_fingerprint(model_path: str | Path, scorer: str, score_threshold: float | None,
                      test_mirror: bool = True, box_voting: bool = True) -> str:
    """What a record depends on besides the image: the model file's bytes, the scorer, the
    threshold, the mirror pass and box voting (a record made with other ones is recomputed)."""
    from proposals.cache import file_sha256

    text = json.dumps({"format": FORMAT, "model_sha256": file_sha256(model_path),
                       "scorer": scorer, "score_threshold": score_threshold,
                       "test_mirror": test_mirror, "box_voting": box_voting},
                      sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# One image


def _detections_list(det: dict) -> tuple[dict[str, Any], ...]:
    """Detector output tensors as record dicts, best score first, rounded for stable files."""
    boxes = det["boxes"].detach().cpu().numpy().astype(np.float64).reshape(-1, 4)
    labels = det["labels"].detach().cpu().numpy().astype(np.int64).reshape(-1)
    scores = det["scores"].detach().cpu().numpy().astype(np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    return tuple({"label": int(labels[i]), "score": round(float(scores[i]), 6),
                  "box": [round(float(v), 2) for v in boxes[i]]}
                 for i in order if np.isfinite(scores[i]) and np.all(np.isfinite(boxes[i])))


def _write_outputs_of_image(record: ImageRecord, pixels: np.ndarray, out_dir: Path,
                            records_dir: Path, classes: Sequence[str], draw_threshold: float,
                            image_dir: Path) -> None:
    """The annotated copy, then the record (so that a record implies its copy exists); refuses
    a target that a symbolic link in OUT would lead into `image_dir`."""
    from data.atomic import atomic_write_json
    from detection.report import draw_detections

    shown = [d for d in record.detections if d["score"] > draw_threshold]
    target = out_dir / record.annotated
    if is_within(target, image_dir):  # a symlinked folder in OUT leading into DIR
        raise SppnetError(f"{target}: leads into {image_dir} (a symbolic link in --out?); "
                          "detect never writes into the input folder")
    try:
        draw_detections(pixels, np.array([d["box"] for d in shown], dtype=np.float64),
                        np.array([d["label"] for d in shown], dtype=np.int64),
                        np.array([d["score"] for d in shown], dtype=np.float64), classes,
                        target)
        atomic_write_json(_record_path(records_dir, record.file), record.to_dict())
    except OSError as exc:
        raise SppnetError(f"{out_dir}: cannot write the outputs of {record.file}: "
                          f"{exc.strerror or exc}") from None


def _detect_image(image: ImageFile, proposals: np.ndarray, detector: Any,
                  score_threshold: float | None) -> tuple[np.ndarray, str, tuple]:
    """(pixels, sha256 of the file, detections) of one image; `ImageLoadError` with a reason
    for anything wrong with this image."""
    from data.images import load_image
    from proposals.cache import file_sha256

    try:
        sha256 = file_sha256(image.path)
    except OSError as exc:
        raise ImageLoadError(image.path, f"cannot read file: {exc.strerror or exc}") from None
    pixels = load_image(image.path)
    try:
        det = detector.detect(pixels, proposals, score_threshold)
    except SppnetError:
        raise  # a setup problem, not this image's
    except MemoryError:
        raise ImageLoadError(image.path, "detection failed: not enough memory") from None
    except Exception as exc:  # noqa: BLE001 - one image's failure must not end the run
        raise ImageLoadError(image.path, f"detection failed: {type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())[:200]}") from None
    return pixels, sha256, _detections_list(det)


# --------------------------------------------------------------------------------------------
# The run


def _reusable(record: ImageRecord | None, image: ImageFile, fingerprint: str, out_dir: Path
              ) -> bool:
    """Whether an earlier run's record still holds for this image."""
    from proposals.cache import file_sha256

    if record is None or record.fingerprint != fingerprint:
        return False
    if not (out_dir / record.annotated).is_file():
        return False
    try:
        return file_sha256(image.path) == record.sha256
    except OSError:
        return False


def _plan(images: Sequence[ImageFile], records: dict[str, ImageRecord], fingerprint: str,
          out_dir: Path) -> tuple[dict[str, ImageRecord], dict[str, str]]:
    """(records reused as they are, annotated name of every image to compute).

    Names of earlier records are reserved first (those of current images, then the others, so
    that no annotated copy of an earlier run is overwritten by another image's), then the new
    images get theirs."""
    names = OutputNames()
    prefix = len(ANNOTATED_DIR) + 1
    current = {image.rel for image in images}
    owned: dict[str, str] = {}
    for rel, record in sorted(records.items(), key=lambda kv: (kv[0] not in current, kv[0])):
        if names.reserve(record.annotated[prefix:]):
            owned[rel] = record.annotated
    reused: dict[str, ImageRecord] = {}
    todo: dict[str, str] = {}
    for image in images:
        record = records.get(image.rel)
        if image.rel in owned and _reusable(record, image, fingerprint, out_dir):
            reused[image.rel] = record
        else:
            todo[image.rel] = owned.get(image.rel) or f"{ANNOTATED_DIR}/{names.assign(image.rel)}"
    return reused, todo


def _proposal_key(rel: str) -> str:
    """The proposal cache key of an image: its relative path, or for a name that is not valid
    UTF-8 (undecodable bytes, kept by Python as surrogates) a digest of its bytes (the cache
    needs keys it can encode)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raw = rel.encode("utf-8", errors="surrogateescape")
        return f"undecodable-name-{hashlib.sha256(raw).hexdigest()}"
    return rel


def _chunks(items: Sequence[ImageFile], size: int) -> Iterator[Sequence[ImageFile]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass(frozen=True)
class _Job:
    """What every image of a run shares."""

    image_dir: Path
    out_dir: Path
    records_dir: Path
    detector: Any
    fingerprint: str
    score_threshold: float | None
    draw_threshold: float


def _process_image(image: ImageFile, proposals: np.ndarray, annotated: str, job: _Job
                   ) -> ImageRecord | SkippedFile:
    """Detect on one image and write its annotated copy and record; a `SkippedFile` when the
    image cannot be read or processed (an output that cannot be written stops the run)."""
    try:
        pixels, sha256, dets = _detect_image(image, proposals, job.detector, job.score_threshold)
    except ImageLoadError as exc:
        return SkippedFile(image.rel, exc.reason)
    record = ImageRecord(image.rel, sha256, job.fingerprint, int(pixels.shape[1]),
                         int(pixels.shape[0]), annotated, dets)
    _write_outputs_of_image(record, pixels, job.out_dir, job.records_dir,
                            job.detector.classes, job.draw_threshold, job.image_dir)
    return record


def detect_folder(image_dir: Path, out_dir: Path, detector: Any, fingerprint: str, *,
                  score_threshold: float | None = None, jobs: int | None = None,
                  progress: bool = True) -> DetectRun:
    """Detect on every image under `image_dir` (see the module docstring), writing into
    `out_dir`; returns the records of the images read, in file order, and the skipped files.

    Images done by an earlier run with the same model and options are reused. The others go
    in rounds of `CHUNK` (bounding memory): selective search proposals (the detector's
    `max_proposals`) through the runner and its cache in `OUT/.sppnet/`, then detection.
    """
    from tqdm import tqdm

    from proposals.cache import ProposalCache
    from proposals.runner import run_proposals
    from proposals.selective_search import ProposalSettings

    start = time.perf_counter()
    scan = scan_folder(image_dir)
    state = out_dir / STATE_DIR
    job = _Job(image_dir, out_dir, state / "records", detector, fingerprint, score_threshold,
               score_threshold if score_threshold is not None
               else CONFIDENT_SCORE.get(detector.scorer, 0.0))
    reused, todo_names = _plan(scan.images, load_records(job.records_dir, len(detector.classes)),
                               fingerprint, out_dir)
    todo = [image for image in scan.images if image.rel in todo_names]
    if progress and reused:
        print(f"detect: {len(reused)} images already done in {out_dir}: reused",
              file=sys.stderr)

    skipped = list(scan.skipped)
    computed: dict[str, ImageRecord] = {}
    settings = ProposalSettings(max_proposals=detector.preset.max_proposals)
    cache = ProposalCache(state / f"proposals-{settings.key()}", settings) if todo else None
    bar = None
    try:
        for chunk in _chunks(todo, CHUNK):
            by_key = {_proposal_key(image.rel): image for image in chunk}
            run = run_proposals([(key, image.path) for key, image in by_key.items()], settings,
                                cache, jobs=jobs, progress=progress)
            if bar is None:  # after the first proposals bar, so that the two do not interleave
                bar = tqdm(total=len(todo), desc=f"detect ({detector.method})", unit="img",
                           file=sys.stderr, disable=not progress, dynamic_ncols=True)
            skipped += [SkippedFile(by_key[error.key].rel, error.reason)
                        for error in run.errors]
            bar.update(len(run.errors))
            for done, result in enumerate(run.results, 1):
                image = by_key[result.key]
                outcome = _process_image(image, result.boxes, todo_names[image.rel], job)
                if isinstance(outcome, SkippedFile):
                    skipped.append(outcome)
                else:
                    computed[outcome.file] = outcome
                bar.update(1)
                release_now_and_then(done)      # images of every size fragment the heap
    finally:
        if bar is not None:
            bar.close()
    done = {**reused, **computed}
    return DetectRun(records=[done[image.rel] for image in scan.images if image.rel in done],
                     skipped=sorted(skipped, key=lambda s: s.rel), reused=len(reused),
                     computed=len(computed), seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Output files


def coco_document(records: Sequence[ImageRecord], classes: Sequence[str],
                  info: dict[str, Any]) -> dict[str, Any]:
    """`detections.json`: COCO images, categories and scored annotations (the format is in the
    module docstring)."""
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": record.file, "width": record.width,
                       "height": record.height, "annotated": record.annotated})
        for det in record.detections:
            x1, y1, x2, y2 = det["box"]
            w, h = round(x2 - x1 + 1, 2), round(y2 - y1 + 1, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": det["label"], "bbox": [x1, y1, w, h],
                                "area": round(w * h, 2), "iscrowd": 0, "score": det["score"]})
    categories = [{"id": k, "name": name} for k, name in enumerate(classes, start=1)]
    return {"info": info, "images": images, "categories": categories,
            "annotations": annotations}


def csv_text(records: Sequence[ImageRecord], classes: Sequence[str]) -> str:
    """`detections.csv`: header `file,class,score,x1,y1,x2,y2` (0-based pixel-inclusive box)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "class", "score", "x1", "y1", "x2", "y2"])
    for record in records:
        for det in record.detections:
            writer.writerow([record.file, classes[det["label"] - 1], det["score"], *det["box"]])
    return buffer.getvalue()


def write_outputs(out_dir: Path, run: DetectRun, classes: Sequence[str],
                  info: dict[str, Any]) -> None:
    """Write `detections.json` and `detections.csv` from the run's records (atomically)."""
    from data.atomic import atomic_write_bytes, atomic_write_json

    try:
        atomic_write_json(out_dir / "detections.json", coco_document(run.records, classes, info))
        atomic_write_bytes(out_dir / "detections.csv",
                           csv_text(run.records, classes).encode("utf-8",
                                                                 errors="backslashreplace"))
    except OSError as exc:
        raise SppnetError(f"{out_dir}: cannot write the detections: {exc.strerror or exc}") \
            from None


def summary_of(run: DetectRun, out_dir: Path, model_path: Path, method: str) -> dict[str, Any]:
    """The `--json` summary: `{"images": [{"file", "detections"}], "errors": [{"file",
    "reason"}]}` plus `out`, `model`, `method`, `reused`, `computed`, `seconds`."""
    return {"images": [{"file": r.file, "detections": len(r.detections)} for r in run.records],
            "errors": [s.to_dict() for s in run.skipped], "out": str(out_dir),
            "model": str(model_path), "method": method, "reused": run.reused,
            "computed": run.computed, "seconds": run.seconds}


# --------------------------------------------------------------------------------------------
# The command


def _printable(name: str) -> str:
    """A file name on one line: control characters (a newline is legal in a POSIX name) shown
    as escapes."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], name)


def run_detect_command(image_dir: str, out: str, *, model: str | None, workdir: str,
                       method: str | None, score_threshold: float | None, device: str | None,
                       jobs: int | None, json_path: str | None, quiet: bool,
                       test_mirror: bool = True, box_voting: bool = True) -> int:
    """`sppnet detect`: check the arguments, find and load the model, run, write the outputs and
    the summary, print one closing line. Returns 0; `SppnetError` for wrong arguments, no
    model, or when no image could be read (after writing the outputs and the summary)."""
    from data.atomic import atomic_write_json
    from detection.devices import resolve_device
    from detection.model import load_detector

    if score_threshold is not None and not math.isfinite(score_threshold):
        raise SppnetError(f"--score-threshold {score_threshold}: must be a finite number")
    root, out_dir = check_folders(image_dir, out, json_path)
    model_path = Path(os.path.abspath(model if model else find_model(workdir, method or "spp")))
    torch_device = resolve_device(device)
    detector = load_detector(model_path, torch_device)
    if method is not None and detector.method != method:
        raise SppnetError(f"{model_path}: a {detector.method} model, not {method}")
    detector.test_mirror = test_mirror
    detector.box_voting = box_voting
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SppnetError(f"--out {out_dir}: cannot create it: {exc.strerror or exc}") from None

    if score_threshold is None:       # a user wants the confident detections, not AP's tail
        score_threshold = CONFIDENT_SCORE.get(detector.scorer, 0.0)
    fingerprint = model_fingerprint(model_path, detector.scorer, score_threshold, test_mirror,
                                    box_voting)
    run = detect_folder(root, out_dir, detector, fingerprint, score_threshold=score_threshold,
                        jobs=jobs, progress=not quiet)
    info = {"description": "sppnet detect", "format": FORMAT, "model": str(model_path),
            "method": detector.method, "scorer": detector.scorer,
            "score_threshold": score_threshold, "test_mirror": test_mirror,
            "box_voting": box_voting, "folder": str(root)}
    write_outputs(out_dir, run, detector.classes, info)
    summary = summary_of(run, out_dir, model_path, detector.method)
    if json_path:
        atomic_write_json(json_path, summary)
    for skipped in run.skipped:
        print(f"skipped {_printable(skipped.rel)}: {skipped.reason}", file=sys.stderr)
    if not run.records:
        what = (f"none of the {len(run.skipped)} image files could be read (first: "
                f"{run.skipped[0].rel}: {run.skipped[0].reason})" if run.skipped
                else "no image file found (images are recognised by their content)")
        raise SppnetError(f"{root}: {what}")
    found = sum(len(r.detections) for r in run.records)
    print(f"detect ({detector.method}): {len(run.records)} images ({run.reused} reused from an "
          f"earlier run), {found} detections, {len(run.skipped)} files skipped, "
          f"{run.seconds:.1f} s; detections.json, detections.csv and annotated/ in {out_dir}")
    return 0
