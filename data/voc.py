"""Reader of PASCAL VOC-layout datasets (VOCdevkit): image sets, annotations, classes.

A root holds `Annotations/<id>.xml`, `JPEGImages/<file>` and `ImageSets/Main/<split>.txt`.
Boxes are converted at this edge from VOC's 1-based inclusive pixel indices to the program's
0-based float `(x1, y1, x2, y2)` (subtract 1; widths stay `x2 - x1 + 1` as in the devkit).

XML goes through defusedxml with DTDs forbidden: an entity-expansion bomb or an external entity is
refused at its declaration, before anything else of the file is read.
"""

from __future__ import annotations

import difflib
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np

from data.errors import AnnotationError, SppnetError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_VOC_ROOT_NAME = re.compile(r"^VOC20\d\d$", re.IGNORECASE)


def voc_to_internal(boxes: np.ndarray) -> np.ndarray:
    """1-based VOC pixel boxes `[N, 4]` -> 0-based float boxes (the program's convention)."""
    return np.asarray(boxes, dtype=np.float64) - 1.0


def internal_to_voc(boxes: np.ndarray) -> np.ndarray:
    """0-based float boxes `[N, 4]` -> 1-based VOC pixel boxes (for result files)."""
    return np.asarray(boxes, dtype=np.float64) + 1.0


@dataclass(frozen=True)
class VOCObject:
    """One annotated object; `box` is 0-based `(x1, y1, x2, y2)`."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool
    truncated: bool


@dataclass(frozen=True)
class VOCImage:
    """One image of a split: its id, file, size and objects (of the dataset's classes only), and
    whether its pixels are read with their EXIF orientation applied (False when the annotation
    was made on the stored pixels: see `data.images.annotated_frame` and `open_voc`)."""

    image_id: str
    path: Path
    width: int
    height: int
    objects: tuple[VOCObject, ...]
    exif_orientation: bool = True

    def load(self) -> np.ndarray:
        """The image's RGB pixels in the frame its boxes were annotated in."""
        from data.images import load_image

        return load_image(self.path, exif_orientation=self.exif_orientation)

    def boxes(self) -> np.ndarray:
        """All object boxes as a float32 array `[N, 4]`, 0-based xyxy."""
        return np.array([o.box for o in self.objects], dtype=np.float32).reshape(-1, 4)

    def difficult(self) -> np.ndarray:
        """Per-object difficult flags `[N]`."""
        return np.array([o.difficult for o in self.objects], dtype=bool)

    def labels(self, classes: Sequence[str]) -> np.ndarray:
        """Per-object labels `[N]`, 1-based indices into `classes` (0 is background)."""
        index = {c: i + 1 for i, c in enumerate(classes)}
        return np.array([index[o.name] for o in self.objects], dtype=np.int64)


class VOCDataset:
    """The images of one split of a VOC-layout root, with the dataset's class list."""

    def __init__(self, root: Path, split: str, classes: tuple[str, ...],
                 images: list[VOCImage], annotated_names: frozenset[str] = frozenset()) -> None:
        self.root = root
        self.split = split
        self.classes = classes
        self.images = images
        self.annotated_names = annotated_names  # every object name in the split's annotations
        self._by_id = {im.image_id: im for im in images}

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[VOCImage]:
        return iter(self.images)

    def __getitem__(self, image_id: str) -> VOCImage:
        return self._by_id[image_id]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._by_id

    def classes_without_objects(self) -> list[str]:
        """The dataset's classes of which the split has no object (nothing to train them on)."""
        present = {o.name for im in self.images for o in im.objects}
        return [c for c in self.classes if c not in present]

    def names_outside_classes(self) -> list[str]:
        """Object names in the split's annotations that are not among the dataset's classes
        (left out of training and evaluation), sorted."""
        return sorted(self.annotated_names - set(self.classes))

    def stored_orientation_ids(self) -> frozenset[str]:
        """Ids of the images whose pixels are read as stored, without their EXIF orientation."""
        return frozenset(im.image_id for im in self.images if not im.exif_orientation)

    @property
    def name(self) -> str:
        """A short name for the dataset: the root folder's name."""
        return self.root.name

    def __repr__(self) -> str:
        return (f"VOCDataset(root={str(self.root)!r}, split={self.split!r}, "
                f"images={len(self.images)}, classes={len(self.classes)})")


def resolve_root(root: str | Path) -> Path:
    """Accept `VOCdevkit/VOC2007` itself or a `VOCdevkit` folder holding exactly one VOC20xx."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise SppnetError(f"{path}: VOC root not found (expected a folder with Annotations/, "
                          f"JPEGImages/ and ImageSets/Main/)")
    if (path / "ImageSets").is_dir() or (path / "Annotations").is_dir():
        return path
    children = [c for c in sorted(path.iterdir()) if c.is_dir() and _VOC_ROOT_NAME.match(c.name)]
    if len(children) == 1:
        return children[0]
    raise SppnetError(f"{path}: not a VOC root (no ImageSets/ or Annotations/ folder inside)")


def list_splits(root: str | Path) -> list[str]:
    """The split names available under `ImageSets/Main/` (files without a class prefix)."""
    main = Path(root) / "ImageSets" / "Main"
    if not main.is_dir():
        return []
    return sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)


def read_split_ids(root: str | Path, split: str) -> list[str]:
    """Image ids listed in `ImageSets/Main/<split>.txt`, in file order, without duplicates.

    A line is an id, optionally followed by a flag as in VOC's per-class lists (`000005 -1`).
    Where an annotation file exists, an id with spaces in it is taken whole and an image file
    name (`000005.jpg`) is taken as its id. A byte-order mark (a split file saved by Windows
    Notepad) is dropped."""
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.parent.is_dir():
        raise AnnotationError(path, f"no such image set: the root has no ImageSets/Main/ folder "
                                    f"(write {split}.txt there, one image id per line)")
    if not path.is_file():
        available = ", ".join(list_splits(root)) or "none"
        raise AnnotationError(path, f"no such image set (available splits: {available})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"cannot read image set: {exc}") from None
    annotations = Path(root) / "Annotations"

    def image_id(line: str) -> str:
        whole = line.strip()
        first = whole.split()[0]
        for candidate in dict.fromkeys((whole, first)):
            stem, ext = os.path.splitext(candidate)
            for name in (candidate, stem if ext.lower() in IMAGE_EXTENSIONS else None):
                if name and (annotations / f"{name}.xml").is_file():
                    return name
        return first

    ids = [image_id(line) for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(ids))


def _parse_xml(path: Path) -> ET.Element:
    """Parse one annotation file safely; every failure is an AnnotationError naming the file."""
    if not path.is_file():
        raise AnnotationError(path, "missing annotation file")
    try:
        return SafeET.parse(path, forbid_dtd=True, forbid_entities=True,
                            forbid_external=True).getroot()
    except defusedxml.DefusedXmlException as exc:
        raise AnnotationError(path, f"refused unsafe XML ({type(exc).__name__}): "
                                    f"DTDs and entities are not allowed in annotations") from None
    except ET.ParseError as exc:
        raise AnnotationError(path, f"malformed XML: {exc}") from None
    except (OSError, UnicodeError, ValueError) as exc:
        raise AnnotationError(path, f"cannot read annotation: {exc}") from None


def _text(elem: ET.Element | None) -> str | None:
    return None if elem is None or elem.text is None else elem.text.strip()


def _number(path: Path, where: str, elem: ET.Element, tag: str) -> float:
    raw = _text(elem.find(tag))
    if raw is None or raw == "":
        raise AnnotationError(path, f"{where} has no <{tag}>")
    try:
        value = float(raw)
    except ValueError:
        raise AnnotationError(path, f"{where}: <{tag}> {raw!r} is not a number") from None
    if not np.isfinite(value):
        raise AnnotationError(path, f"{where}: <{tag}> {raw!r} is not a finite number")
    return value


def _flag(elem: ET.Element, tag: str) -> bool:
    raw = _text(elem.find(tag))
    if not raw:
        return False
    try:
        return float(raw) != 0
    except ValueError:
        return raw.lower() in ("true", "yes")


@dataclass(frozen=True)
class Annotation:
    """The content of one annotation file: file name, size (0 when absent) and all objects."""

    filename: str | None
    width: int
    height: int
    objects: tuple[VOCObject, ...]


def parse_annotation(path: str | Path) -> Annotation:
    """Read one VOC XML file. Boxes come back 0-based; a malformed file raises AnnotationError."""
    path = Path(path)
    root = _parse_xml(path)
    if root.tag != "annotation":
        raise AnnotationError(path, f"root element is <{root.tag}>, expected <annotation>")
    width = height = 0
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width = int(_number(path, "<size>", size, "width"))
        height = int(_number(path, "<size>", size, "height"))
    objects = []
    for k, obj in enumerate(root.findall("object"), start=1):
        where = f"object {k}"
        name = _text(obj.find("name"))
        if not name:
            raise AnnotationError(path, f"{where} has no <name>")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise AnnotationError(path, f"{where} ({name}) has no <bndbox>")
        x1, y1, x2, y2 = (_number(path, f"{where} ({name})", bnd, t)
                          for t in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise AnnotationError(path, f"{where} ({name}): empty box xmin={x1:g} ymin={y1:g} "
                                        f"xmax={x2:g} ymax={y2:g}")
        box = tuple(float(v) for v in voc_to_internal(np.array([x1, y1, x2, y2])))
        objects.append(VOCObject(name, box, _flag(obj, "difficult"), _flag(obj, "truncated")))
    return Annotation(_text(root.find("filename")), width, height, tuple(objects))


def discover_classes(root: str | Path) -> tuple[str, ...]:
    """The classes of a root: VOC's 20 for a VOC20xx folder, else all names found in its
    annotations, sorted (so that every split of one root gets the same class list)."""
    root = Path(root)
    if _VOC_ROOT_NAME.match(root.name):
        return VOC_CLASSES
    names = {o.name for xml in sorted((root / "Annotations").glob("*.xml"))
             for o in parse_annotation(xml).objects}
    if not names:
        raise SppnetError(f"{root / 'Annotations'}: no annotated objects found, cannot infer the "
                          f"classes (pass --classes a,b,c)")
    return tuple(sorted(names))


def find_image_file(root: Path, image_id: str, filename: str | None = None) -> Path:
    """The image file of `image_id` in `JPEGImages/`: `<id>.jpg`, the annotation's filename, or
    `<id>.<ext>` for another image extension. Missing files are left to the loader to report."""
    folder = root / "JPEGImages"
    candidates = [folder / f"{image_id}.jpg"]
    if filename:
        candidates.append(folder / Path(filename).name)
    candidates += [folder / f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS + tuple(
        e.upper() for e in IMAGE_EXTENSIONS)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def parse_class_list(text: str | None) -> tuple[str, ...] | None:
    """`"a,b,c"` -> `("a", "b", "c")`; None or empty -> None. Duplicates are an error."""
    if not text:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if len(set(names)) != len(names):
        raise SppnetError(f"--classes {text!r}: a class is listed twice")
    return names or None


def open_voc(root: str | Path, split: str, classes: Sequence[str] | None = None,
             need_images: bool = True) -> VOCDataset:
    """Read split `split` of the VOC-layout `root`; with `need_images` (all but scoring do)
    a root without `JPEGImages/` is a one-line error naming the folders it has.

    `classes` restricts and orders the classes (objects of other classes are left out); by default
    see `discover_classes`. Image sizes come from the annotation, or the image header when absent.
    An annotated size that is the stored one of a photo that EXIF turns by 90 degrees means its
    boxes belong to the stored pixels, which are then read without the turn; oriented photos
    whose size cannot tell (square ones, half turns) follow the split's other oriented photos
    (one annotation tool made them all), or EXIF when those do not say otherwise.
    """
    from data.images import annotated_frame, read_image_size

    root = resolve_root(root)
    if need_images and not (root / "JPEGImages").is_dir():
        found = short_list(sorted(p.name + "/" for p in root.iterdir() if p.is_dir()))
        raise SppnetError(f"{root}: no JPEGImages/ folder, where a VOC layout keeps the images "
                          f"(this root has: {found or 'no folders'})")
    class_list = tuple(classes) if classes else discover_classes(root)
    wanted = set(class_list)
    images = []
    names: set[str] = set()
    for image_id in read_split_ids(root, split):
        ann = parse_annotation(root / "Annotations" / f"{image_id}.xml")
        names.update(o.name for o in ann.objects)
        path = find_image_file(root, image_id, ann.filename)
        width, height, frame = ann.width, ann.height, "same"
        if width <= 0 or height <= 0:
            width, height = read_image_size(path)
        else:
            frame = annotated_frame(path, width, height)
        objects = tuple(o for o in ann.objects if o.name in wanted)
        images.append((VOCImage(image_id, path, width, height, objects, frame != "stored"),
                       frame))
    frames = [frame for _, frame in images]
    unknown_shown = frames.count("stored") <= frames.count("shown")  # EXIF unless outvoted
    return VOCDataset(root, split, class_list,
                      [replace(im, exif_orientation=unknown_shown) if frame == "unknown" else im
                       for im, frame in images], frozenset(names))


def plural(count: int, noun: str, ending: str = "s") -> str:
    """`count` and `noun`, with `ending` after one: "1 more image", "2 more images"."""
    return f"{count} {noun}{ending * (count != 1)}"


def short_list(names: Sequence[str], limit: int = 12) -> str:
    """`names` joined by commas for a one-line message, the first `limit` of them and '...'."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def missing_classes_message(dataset: VOCDataset) -> str | None:
    """A one-line message naming the dataset's classes that its split has no object of (a typo
    or another case in `--classes` is the usual cause) with the closest annotated names, or
    None when every class has objects."""
    missing = dataset.classes_without_objects()
    if not missing:
        return None
    found = sorted(dataset.annotated_names)
    hints = []
    for name in missing:
        close = [n for n in found if n.lower() == name.lower()] or \
            difflib.get_close_matches(name, found, n=1, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    listed = short_list(found) if found else "none"
    ending = "es" if len(missing) > 1 else ""
    return (f"{dataset.root}/ImageSets/Main/{dataset.split}.txt: no objects of class{ending} "
            f"{', '.join(hints)} in this split (its annotations name: {listed}; class names "
            f"are case-sensitive)")


def objects_outside_message(dataset: VOCDataset) -> str | None:
    """A one-line message naming the first annotation file of the split with an object (not
    difficult) whose box lies wholly outside its image, with a count of the others, or None.
    No detection can match such an object, so scoring counts it as missed, as the devkit does."""
    found = [(im, o) for im in dataset.images for o in im.objects
             if not o.difficult and (o.box[0] > im.width - 1 or o.box[1] > im.height - 1
                                     or o.box[2] < 0 or o.box[3] < 0)]
    if not found:
        return None
    image, obj = found[0]
    more = f" ({plural(len(found) - 1, 'more object')} like it in the split)" \
        if len(found) > 1 else ""
    return (f"{dataset.root / 'Annotations' / (image.image_id + '.xml')}: the box of an object "
            f"({obj.name}) lies wholly outside its {image.width}x{image.height} image, so no "
            f"detection can match it and it counts as missed{more}")
