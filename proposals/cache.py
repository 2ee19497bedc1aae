"""On-disk cache of selective search proposals: one file per image, safe to kill, never stale.

Layout: `WORKDIR/proposals/<dataset-name>-<settings.key()>/<image-id>.npz` (an id that is not a
plain file name becomes `<slug>-<sha1 of the id, 12 hex>.npz`). Each folder also holds
`settings.json` (the settings, for people; the folder name already pins them).

Entry format: an uncompressed NumPy `.npz` (a zip of `.npy` arrays, each with a CRC-32), read with
`np.load(allow_pickle=False)` (nothing is ever unpickled), holding exactly:

- `boxes`: float32 `[N, 4]`, 0-based pixel-inclusive `(x1, y1, x2, y2)`, best ranked first;
- `meta`:  uint8 `[L]`, UTF-8 JSON with
  `format` (1), `image_id`, `image_sha256` (of the image file's bytes; `+stored-orientation`
  appended when the pixels were read without their EXIF orientation), `settings_key`,
  `boxes_sha256` (of `boxes`' raw little-endian bytes), `count` (N), `seconds` (compute time
  measured where the image was processed), `width`, `height` (of the image).

An entry is served only when the file parses, its `format`, `image_id`, `settings_key` and
`image_sha256` match the request (so an edited image is recomputed, whatever its name) and the
boxes match `count` and `boxes_sha256` (a damaged or truncated file is detected, reported as a
miss and overwritten). Entries are written atomically (temporary file in the same folder, fsync,
rename): a run killed with `kill -9` leaves complete entries or none, and a rerun resumes.

Longer lists serve shorter ones: the kept boxes are the first `max_proposals` of a ranking that
does not depend on it, so a cache made with more (`sppnet proposals`' 2000, say) holds every
shorter list as its prefix. `for_dataset` finds such caches of the same dataset and otherwise
equal settings, and `load` serves a miss from them, cut to length and stored here.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass, replace
from glob import escape as glob_escape
from pathlib import Path
from typing import Sequence

import numpy as np

from data.atomic import atomic_write, atomic_write_json
from data.errors import SppnetError
from proposals.selective_search import ProposalSettings

__all__ = ["ProposalCache", "CacheEntry", "file_sha256", "cache_dir"]

FORMAT = 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,150}$")
_STALE_TMP_SECONDS = 3600.0


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks). OSError propagates."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _boxes_sha256(boxes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(boxes, dtype="<f4").tobytes()).hexdigest()


def _safe_folder_name(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "images"
    return slug[:80]


def cache_dir(workdir: str | Path, dataset_name: str, settings: ProposalSettings) -> Path:
    """`WORKDIR/proposals/<dataset-name>-<settings key>`."""
    return Path(workdir) / "proposals" / f"{_safe_folder_name(dataset_name)}-{settings.key()}"


@dataclass(frozen=True)
class CacheEntry:
    """One cached result: the boxes and what they were computed from."""

    image_id: str
    boxes: np.ndarray
    seconds: float
    width: int
    height: int
    image_sha256: str


class ProposalCache:
    """The proposals of one dataset under one setting, one `.npz` entry per image.

    `load(image_id, image_sha256)` returns a valid entry or None (missing, stale or damaged);
    `store(...)` writes one atomically. Safe for several processes writing different images.
    """

    def __init__(self, directory: str | Path, settings: ProposalSettings,
                 longer: Sequence["ProposalCache"] = ()) -> None:
        self.directory = Path(directory)
        self.settings = settings
        self.settings_key = settings.key()
        self.damaged: list[str] = []  # ids whose entry existed but was unusable, this session
        self.longer = tuple(longer)   # caches of longer lists that serve a miss (their prefix)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            settings_file = self.directory / "settings.json"
            if not settings_file.is_file():
                atomic_write_json(settings_file, {"format": FORMAT, "key": self.settings_key,
                                                  "settings": settings.to_dict()})
        except OSError as exc:
            raise SppnetError(f"{self.directory}: cannot create the proposal cache: "
                              f"{exc.strerror or exc}") from None
        self._remove_stale_temporaries()

    @classmethod
    def for_dataset(cls, workdir: str | Path, dataset_name: str,
                    settings: ProposalSettings) -> "ProposalCache":
        """The cache of `dataset_name` under `workdir` (see `cache_dir`), served also from
        the caches of that dataset with longer lists (`longer_caches`)."""
        directory = cache_dir(workdir, dataset_name, settings)
        return cls(directory, settings, longer_caches(directory, settings))

    def path(self, image_id: str) -> Path:
        """The entry file of `image_id`."""
        if _SAFE_NAME.match(image_id):
            return self.directory / f"{image_id}.npz"
        digest = hashlib.sha1(image_id.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._")[:60] or "image"
        return self.directory / f"{slug}-{digest}.npz"

    def load(self, image_id: str, image_sha256: str) -> CacheEntry | None:
        """The entry of `image_id` if it exists, is intact, and was computed from an image with
        `image_sha256` under these settings, or else the same from a cache of a longer list,
        cut to this one's length and stored here; else None (a damaged entry is noted in
        `self.damaged` and will be overwritten by the next `store`)."""
        entry = self._load_own(image_id, image_sha256)
        if entry is not None:
            return entry
        for longer in self.longer:
            found = longer._load_own(image_id, image_sha256)
            if found is not None:
                boxes = np.ascontiguousarray(found.boxes[:self.settings.max_proposals])
                self.store(image_id, image_sha256, boxes, found.seconds, found.width,
                           found.height)
                return CacheEntry(image_id, boxes, found.seconds, found.width, found.height,
                                  image_sha256)
        return None

    def _load_own(self, image_id: str, image_sha256: str) -> CacheEntry | None:
        """`load` from this cache's own folder only."""
        path = self.path(image_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            self.damaged.append(image_id)
            return None
        entry = _parse_entry(raw)
        if entry is None:
            self.damaged.append(image_id)
            return None
        meta, boxes = entry
        if (meta.get("image_id") != image_id or meta.get("settings_key") != self.settings_key
                or meta.get("image_sha256") != image_sha256):
            return None  # stale: another image content or settings; recomputed and replaced
        return CacheEntry(image_id, boxes, float(meta["seconds"]), int(meta["width"]),
                          int(meta["height"]), image_sha256)

    def store(self, image_id: str, image_sha256: str, boxes: np.ndarray, seconds: float,
              width: int, height: int) -> Path:
        """Write the entry of `image_id` atomically; returns its path."""
        boxes = np.ascontiguousarray(np.asarray(boxes, dtype="<f4").reshape(-1, 4))
        meta = {"format": FORMAT, "image_id": image_id, "image_sha256": image_sha256,
                "settings_key": self.settings_key, "boxes_sha256": _boxes_sha256(boxes),
                "count": int(len(boxes)), "seconds": float(seconds), "width": int(width),
                "height": int(height)}
        meta_bytes = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"),
                                   dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, boxes=boxes, meta=meta_bytes)
        data = buffer.getvalue()
        try:
            return atomic_write(self.path(image_id), lambda f: f.write(data))
        except OSError as exc:
            raise SppnetError(f"{self.path(image_id)}: cannot write proposal cache entry: "
                              f"{exc.strerror or exc}") from None

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files that a killed run left (older than an hour, so that a run
        writing into the same folder right now is not disturbed)."""
        now = time.time()
        for tmp in self.directory.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink()
            except OSError:
                pass


def longer_caches(directory: Path, settings: ProposalSettings) -> list[ProposalCache]:
    """The caches beside `directory` (same dataset) whose settings differ from `settings` only
    by a larger `max_proposals`, largest first. A folder whose `settings.json` is missing,
    unreadable or not of this algorithm version is passed over."""
    prefix = directory.name[:-len(settings.key())]
    found = []
    try:
        siblings = sorted(directory.parent.glob(f"{glob_escape(prefix)}*"))
    except OSError:
        return []
    for folder in siblings:
        if folder == directory or len(folder.name) != len(directory.name):
            continue
        try:
            recorded = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
            other = ProposalSettings(**recorded["settings"])
        except Exception:  # noqa: BLE001 - any unreadable folder is simply not used
            continue
        if (recorded.get("format") != FORMAT or other.key() != recorded.get("key")
                or other.key() != folder.name[len(prefix):]):
            continue
        if (other.max_proposals > settings.max_proposals
                and replace(other, max_proposals=settings.max_proposals) == settings):
            found.append(ProposalCache(folder, other))
    return sorted(found, key=lambda c: -c.settings.max_proposals)


def _parse_entry(raw: bytes) -> tuple[dict, np.ndarray] | None:
    """(meta, boxes) of a valid entry's bytes, or None when anything is off."""
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            if set(npz.files) != {"boxes", "meta"}:
                return None
            boxes = npz["boxes"]
            meta_raw = npz["meta"]
        if meta_raw.dtype != np.uint8 or meta_raw.ndim != 1:
            return None
        meta = json.loads(meta_raw.tobytes().decode("utf-8"))
    except Exception:  # noqa: BLE001 - any parse failure means "damaged"
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    if boxes.dtype != np.dtype("<f4") or boxes.ndim != 2 or boxes.shape[1] != 4:
        return None
    try:
        if int(meta["count"]) != len(boxes) or meta["boxes_sha256"] != _boxes_sha256(boxes):
            return None
        float(meta["seconds"]), int(meta["width"]), int(meta["height"])
    except (KeyError, TypeError, ValueError):
        return None
    return meta, np.ascontiguousarray(boxes)
