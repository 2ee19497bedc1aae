"""VOC detection result files: `comp4_det_<split>_<class>.txt`, one line per detection,
`image_id score x1 y1 x2 y2` in 1-based VOC pixels (the devkit's format).

In memory, detections of one class are a `ClassDetections`: parallel image ids, scores and
0-based boxes. `detections_by_class` converts torchvision-style per-image outputs to that form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from data.atomic import atomic_write_text
from data.errors import ResultFileError
from data.voc import internal_to_voc, voc_to_internal


@dataclass
class ClassDetections:
    """Detections of one class over a split: `image_ids[i]`, `scores[i]`, `boxes[i]` (0-based)."""

    image_ids: list[str] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float64))

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if not len(self.image_ids) == len(self.scores) == len(self.boxes):
            raise ValueError("image_ids, scores and boxes must have the same length")

    def __len__(self) -> int:
        return len(self.image_ids)


def _file_name_part(text: str) -> str:
    """`text` as part of one file name: `%`, path separators and control characters
    percent-encoded, so that a class name from an annotation (`a/b`, `../x`) never names
    another folder; VOC's names are unchanged."""
    return "".join(f"%{ord(c):02X}" if c in "%/\\" or ord(c) < 32 else c for c in text)


def result_file_name(split: str, class_name: str) -> str:
    """The devkit's file name for one class's detections (competition 4: any training data)."""
    return f"comp4_det_{_file_name_part(split)}_{_file_name_part(class_name)}.txt"


def detections_by_class(per_image: Mapping[str, Mapping[str, object]],
                        classes: Sequence[str]) -> dict[str, ClassDetections]:
    """Regroup `{image_id: {"boxes": [N,4], "labels": [N], "scores": [N]}}` (labels 1-based,
    0 = background, tensors or arrays) into one `ClassDetections` per class."""
    ids: list[str] = []
    boxes, labels, scores = [], [], []
    for image_id, det in per_image.items():
        lab = np.asarray(det["labels"]).reshape(-1)
        ids.extend([image_id] * len(lab))
        labels.append(lab)
        scores.append(np.asarray(det["scores"], dtype=np.float64).reshape(-1))
        boxes.append(np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4))
    all_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    all_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    id_array = np.array(ids, dtype=object)
    out = {}
    for k, name in enumerate(classes, start=1):
        keep = np.flatnonzero(all_labels == k)
        out[name] = ClassDetections(list(id_array[keep]), all_scores[keep], all_boxes[keep])
    return out


def write_voc_results(out_dir: str | Path, split: str,
                      detections: Mapping[str, ClassDetections]) -> list[Path]:
    """Write one result file per class (empty classes get an empty file), each atomically."""
    out_dir = Path(out_dir)
    written = []
    for name, dets in detections.items():
        voc_boxes = internal_to_voc(dets.boxes)
        lines = [f"{image_id} {score:.8g} {b[0]:.3f} {b[1]:.3f} {b[2]:.3f} {b[3]:.3f}\n"
                 for image_id, score, b in zip(dets.image_ids, dets.scores, voc_boxes)]
        written.append(atomic_write_text(out_dir / result_file_name(split, name), "".join(lines)))
    return written


def read_result_file(path: str | Path) -> ClassDetections:
    """Read one result file; a malformed line raises ResultFileError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultFileError(path, f"cannot read: {exc}") from None
    ids, values = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        # the last five fields are numbers; the id before them may hold spaces ("my photo 1")
        fields = line.strip().rsplit(None, 5)
        if len(fields) != 6:
            raise ResultFileError(path, f"line {number}: expected 'image_id score x1 y1 x2 y2', "
                                        f"got {len(fields)} fields")
        try:
            row = [float(v) for v in fields[1:]]
        except ValueError:
            raise ResultFileError(path, f"line {number}: score and box must be numbers") from None
        if not np.all(np.isfinite(row)):
            raise ResultFileError(path, f"line {number}: score and box must be finite numbers")
        ids.append(fields[0])
        values.append(row)
    arr = np.array(values, dtype=np.float64).reshape(-1, 5)
    return ClassDetections(ids, arr[:, 0], voc_to_internal(arr[:, 1:]))


def read_voc_results(det_dir: str | Path, split: str,
                     classes: Sequence[str]) -> tuple[dict[str, ClassDetections], list[str]]:
    """Read the result files of `classes` in `det_dir`.

    Returns the detections per class and the classes whose file is missing (they count as
    having no detections, i.e. AP 0 where the class has ground truth).
    """
    det_dir = Path(det_dir)
    out, missing = {}, []
    for name in classes:
        path = det_dir / result_file_name(split, name)
        if path.is_file():
            out[name] = read_result_file(path)
        else:
            out[name] = ClassDetections()
            missing.append(name)
    return out, missing
