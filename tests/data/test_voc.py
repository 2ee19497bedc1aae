"""The VOC reader: box conventions, classes, splits, difficult/truncated, malformed files."""

from __future__ import annotations

import numpy as np
import pytest

from data.errors import AnnotationError, SppnetError
from data.voc import (VOC_CLASSES, discover_classes, internal_to_voc, missing_classes_message,
                      objects_outside_message, open_voc, parse_annotation, parse_class_list,
                      plural, read_split_ids, short_list, voc_to_internal)


def test_box_conventions_round_trip():
    voc = np.array([[1, 1, 500, 375], [48, 240, 195, 371]], dtype=np.float64)
    internal = voc_to_internal(voc)
    assert internal[0].tolist() == [0, 0, 499, 374]
    assert np.array_equal(internal_to_voc(internal), voc)
    # width in pixels is the same in both conventions: x2 - x1 + 1
    assert internal[1, 2] - internal[1, 0] + 1 == 195 - 48 + 1


def test_reader_reads_split_objects_and_flags(tiny_voc):
    ds = open_voc(tiny_voc, "trainval")
    assert ds.classes == ("bird", "cat", "dog")          # found in all annotations, sorted
    assert [im.image_id for im in ds] == ["img1", "img2"]
    img1 = ds["img1"]
    assert (img1.width, img1.height) == (64, 48)
    assert img1.path.name == "img1.jpg" and img1.path.is_file()
    assert img1.boxes().tolist() == [[0, 0, 19, 19], [29, 9, 59, 39]]
    assert img1.difficult().tolist() == [False, True]
    assert img1.labels(ds.classes).tolist() == [2, 3]
    assert ds["img2"].objects[0].truncated and not ds["img2"].objects[0].difficult


def test_classes_same_for_every_split(tiny_voc):
    assert open_voc(tiny_voc, "test").classes == open_voc(tiny_voc, "trainval").classes


def test_custom_class_list_filters_and_orders(tiny_voc):
    ds = open_voc(tiny_voc, "all", classes=parse_class_list("dog,cat"))
    assert ds.classes == ("dog", "cat")
    assert [o.name for o in ds["img3"].objects] == ["cat"]      # bird left out
    assert ds["img1"].labels(ds.classes).tolist() == [2, 1]


def test_classes_without_objects_are_named_with_the_closest_annotated_name(tiny_voc):
    """A class the split has no object of: another case or a typo gets a hint, a name nothing
    resembles gets none, and the split's annotated names are listed (other classes' too)."""
    assert missing_classes_message(open_voc(tiny_voc, "all")) is None
    ds = open_voc(tiny_voc, "trainval", classes=("Cat", "dgo", "zebra"))
    assert ds.classes_without_objects() == ["Cat", "dgo", "zebra"]
    assert ds.annotated_names == {"cat", "dog"}
    message = missing_classes_message(ds)
    assert message.startswith(str(tiny_voc / "ImageSets" / "Main" / "trainval.txt") + ": ")
    assert ("classes 'Cat' (did you mean 'cat'?), 'dgo' (did you mean 'dog'?), 'zebra' in "
            "this split" in message)
    assert "its annotations name: cat, dog;" in message and "\n" not in message
    # discovered classes: bird is only in the test split's annotations
    assert open_voc(tiny_voc, "trainval").classes_without_objects() == ["bird"]


def test_names_outside_the_classes_and_short_lists(tiny_voc):
    """Annotated names that a class list leaves out are listed, sorted; long lists are cut."""
    assert open_voc(tiny_voc, "all").names_outside_classes() == []
    assert open_voc(tiny_voc, "all", classes=("dog",)).names_outside_classes() == ["bird", "cat"]
    assert short_list(["a", "b"]) == "a, b"
    assert short_list([str(i) for i in range(5)], limit=3) == "0, 1, 2, ..."
    assert (plural(1, "box", "es"), plural(2, "box", "es"), plural(0, "image")) == (
        "1 box", "2 boxes", "0 images")


def test_objects_wholly_outside_their_image_are_named_once(tiny_voc, voc_writer, tmp_path):
    """An object whose box lies wholly outside its image (not difficult) can never be detected:
    one message names the first annotation file and counts the others; reaching out is fine."""
    assert objects_outside_message(open_voc(tiny_voc, "all")) is None
    images = {"a": (64, 48, [("cat", (10, 10, 80, 40), 0, 0), ("dog", (70, 5, 90, 20), 0, 0)]),
              "b": (64, 48, [("cat", (5, 50, 20, 60), 0, 0), ("cat", (5, -20, 20, 0), 0, 0),
                             ("dog", (-30, 5, -1, 20), 1, 0)])}
    root = voc_writer(tmp_path / "outside", images, {"test": ["a", "b"]})
    message = objects_outside_message(open_voc(root, "test"))
    assert message.endswith("a.xml: the box of an object (dog) lies wholly outside its 64x48 "
                            "image, so no detection can match it and it counts as missed "
                            "(2 more objects like it in the split)")


def test_voc2007_root_gets_the_20_classes(tmp_path, voc_writer):
    root = voc_writer(tmp_path / "VOCdevkit" / "VOC2007",
                      {"000001": (50, 50, [("dog", (1, 1, 10, 10), 0, 0)])}, {"test": ["000001"]})
    assert discover_classes(root) == VOC_CLASSES
    # the VOCdevkit folder above it works too
    assert open_voc(tmp_path / "VOCdevkit", "test").classes == VOC_CLASSES


def test_split_file_tolerates_blank_lines_and_flags(tmp_path, tiny_voc):
    (tiny_voc / "ImageSets" / "Main" / "odd.txt").write_text("img1  1\n\nimg2 -1\nimg1 1\n")
    assert read_split_ids(tiny_voc, "odd") == ["img1", "img2"]


def test_split_file_with_a_byte_order_mark_and_ids_with_spaces(tmp_path, tiny_voc):
    """A split file saved with a BOM and CRLF line ends (Windows Notepad), and an id with a
    space and an image file name, whose annotations exist: each id as its annotation file
    names it."""
    annotations = tiny_voc / "Annotations"
    (annotations / "my photo 1.xml").write_bytes((annotations / "img2.xml").read_bytes())
    (tiny_voc / "ImageSets" / "Main" / "win.txt").write_bytes(
        "\ufeffimg1\r\nmy photo 1\r\nimg2 -1\r\nimg3.JPG\r\n".encode("utf-8"))
    assert read_split_ids(tiny_voc, "win") == ["img1", "my photo 1", "img2", "img3"]
    assert [im.image_id for im in open_voc(tiny_voc, "win")] == [
        "img1", "my photo 1", "img2", "img3"]


def test_missing_split_names_available_ones(tiny_voc):
    with pytest.raises(AnnotationError, match="available splits: all, test, trainval"):
        open_voc(tiny_voc, "val")


def test_a_root_without_image_sets_or_images_says_what_is_missing(tiny_voc):
    """An export with its images in another folder, or without ImageSets/Main/, gets one line
    that says what a VOC layout wants there; scoring, which reads no image, needs no images."""
    import shutil

    shutil.move(tiny_voc / "JPEGImages", tiny_voc / "images")
    with pytest.raises(SppnetError, match=r"no JPEGImages/ folder, where a VOC layout keeps the "
                                          r"images \(this root has: Annotations/, ImageSets/, "
                                          r"images/\)"):
        open_voc(tiny_voc, "test")
    assert len(open_voc(tiny_voc, "test", need_images=False)) == 1
    shutil.rmtree(tiny_voc / "ImageSets")
    with pytest.raises(AnnotationError, match=r"Main/test.txt: no such image set: the root has "
                                              r"no ImageSets/Main/ folder \(write test.txt"):
        open_voc(tiny_voc, "test", need_images=False)


def test_missing_annotation_names_the_file(tiny_voc):
    (tiny_voc / "Annotations" / "img2.xml").unlink()
    with pytest.raises(AnnotationError) as err:
        open_voc(tiny_voc, "trainval", classes=("cat", "dog"))
    assert "img2.xml" in str(err.value) and "missing" in str(err.value)


@pytest.mark.parametrize("content, reason", [
    ("<annotation><object><name>cat</name>", "malformed XML"),
    ("", "malformed XML"),
    ("<notvoc/>", "expected <annotation>"),
    ("<annotation><object><name>cat</name></object></annotation>", "no <bndbox>"),
    ("<annotation><object><bndbox><xmin>1</xmin></bndbox></object></annotation>", "no <name>"),
    ("<annotation><object><name>cat</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax>"
     "<ymax>2</ymax></bndbox></object></annotation>", "'a' is not a number"),
    ("<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
     "</bndbox></object></annotation>", "no <ymax>"),
    ("<annotation><object><name>cat</name><bndbox><xmin>9</xmin><ymin>1</ymin><xmax>2</xmax>"
     "<ymax>5</ymax></bndbox></object></annotation>", "empty box"),
])
def test_malformed_annotation_is_one_line_error(tmp_path, content, reason):
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(AnnotationError) as err:
        parse_annotation(path)
    message = str(err.value)
    assert message.startswith(str(path)) and reason in message and "\n" not in message


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><object><name>&lol3;</name></object></annotation>"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<annotation><filename>&xxe;</filename></annotation>"""

DTD_ONLY = """<?xml version="1.0"?><!DOCTYPE annotation SYSTEM "http://example.invalid/x.dtd">
<annotation/>"""


@pytest.mark.parametrize("content", [BILLION_LAUGHS, EXTERNAL_ENTITY, DTD_ONLY])
def test_hostile_xml_is_refused(tmp_path, content):
    path = tmp_path / "evil.xml"
    path.write_text(content)
    with pytest.raises(AnnotationError, match="refused unsafe XML") as err:
        parse_annotation(path)
    assert "\n" not in str(err.value)


def test_hostile_annotation_stops_the_split(tiny_voc):
    (tiny_voc / "Annotations" / "img1.xml").write_text(BILLION_LAUGHS)
    with pytest.raises(AnnotationError, match="img1.xml"):
        open_voc(tiny_voc, "trainval", classes=("cat",))


def test_float_coordinates_and_missing_size(tmp_path, voc_writer):
    root = voc_writer(tmp_path / "r", {"a": (30, 20, [("x", (1.5, 2, 10.25, 12), 0, 0)])},
                      {"s": ["a"]})
    xml = root / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<size><width>30</width><height>20</height>"
                                           "<depth>3</depth></size>", ""))
    image = open_voc(root, "s")["a"]
    assert (image.width, image.height) == (30, 20)      # read from the image header
    assert image.boxes().tolist() == [[0.5, 1, 9.25, 11]]


def test_duplicate_class_in_list_is_an_error():
    with pytest.raises(SppnetError):
        parse_class_list("a,b,a")


def test_root_not_found(tmp_path):
    with pytest.raises(SppnetError, match="not found"):
        open_voc(tmp_path / "nope", "test")


@pytest.mark.parametrize("annotated, turned", [((64, 32), False), ((32, 64), True)])
def test_exif_turned_photo_is_read_in_the_annotated_frame(tmp_path, voc_writer, annotated,
                                                          turned):
    # a phone photo stored 64x32 with EXIF orientation 6 (shown 32x64): tools that ignore the
    # tag annotate the stored pixels, tools that apply it the turned ones; the annotated size
    # tells which, and the pixels are read in that frame
    from PIL import Image

    width, height = annotated
    root = voc_writer(tmp_path / "r", {"a": (width, height, [("x", (2, 2, 20, 20), 0, 0)])},
                      {"s": ["a"]})
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 32), (200, 10, 10)).save(root / "JPEGImages" / "a.jpg",
                                                   exif=exif.tobytes())
    dataset = open_voc(root, "s")
    image = dataset["a"]
    assert image.exif_orientation is turned
    assert image.load().shape == (height, width, 3)
    assert dataset.stored_orientation_ids() == (frozenset() if turned else {"a"})


@pytest.mark.parametrize("frame", ["stored", "shown"])
def test_photos_the_size_cannot_place_follow_the_splits_other_photos(tmp_path, voc_writer,
                                                                   frame):
    # a square photo with EXIF orientation 6 is 32x32 either way: it is read as the split's
    # photos whose size does tell were annotated; with none of those, as EXIF shows it
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    telling = (64, 32) if frame == "stored" else (32, 64)
    box = [("x", (2, 2, 20, 20), 0, 0)]
    root = voc_writer(tmp_path / "r", {"wide": (*telling, box), "square": (32, 32, box),
                                       "plain": (40, 30, box)},
                      {"all": ["wide", "square", "plain"], "alone": ["square", "plain"]})
    for image_id, size in (("wide", (64, 32)), ("square", (32, 32))):
        Image.new("RGB", size, (9, 99, 199)).save(root / "JPEGImages" / f"{image_id}.jpg",
                                                  exif=exif.tobytes())
    dataset = open_voc(root, "all")
    expected = {"wide", "square"} if frame == "stored" else set()
    assert dataset.stored_orientation_ids() == expected
    assert open_voc(root, "alone").stored_orientation_ids() == frozenset()
