"""Tests of data/images.py: every file is generated here, under tmp_path."""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.images as images
from data.errors import ImageLoadError
from data.images import annotated_frame, is_image_file, load_image, read_image_size

# --------------------------------------------------------------------------------------------
# Helpers


def quadrants(width: int = 64, height: int = 32) -> np.ndarray:
    """An RGB image with four flat quadrants (red, green / blue, white): survives JPEG."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    arr[:h2, :w2] = (255, 0, 0)
    arr[:h2, w2:] = (0, 255, 0)
    arr[h2:, :w2] = (0, 0, 255)
    arr[h2:, w2:] = (255, 255, 255)
    return arr


def quadrant_means(arr: np.ndarray) -> np.ndarray:
    """Mean colour of the centre of each quadrant (margins dropped against JPEG ringing)."""
    h, w = arr.shape[:2]
    out = []
    for ys in ((h // 8, 3 * h // 8), (5 * h // 8, 7 * h // 8)):
        for xs in ((w // 8, 3 * w // 8), (5 * w // 8, 7 * w // 8)):
            out.append(arr[ys[0]:ys[1], xs[0]:xs[1]].reshape(-1, 3).mean(axis=0))
    return np.array(out)


def assert_rgb(arr: np.ndarray, width: int, height: int) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.shape == (height, width, 3)
    assert arr.flags["C_CONTIGUOUS"]


def assert_good(path: Path, width: int, height: int) -> np.ndarray:
    """load_image, read_image_size and is_image_file agree on a good file."""
    arr = load_image(path)
    assert_rgb(arr, width, height)
    assert read_image_size(path) == (width, height)
    assert read_image_size(str(path)) == (width, height)
    assert is_image_file(path) and is_image_file(str(path))
    return arr


def assert_load_error(path: Path, reason_part: str) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    err = info.value
    text = str(err)
    assert str(path) in text
    assert err.path == str(path)
    assert err.reason and reason_part in err.reason
    assert "\n" not in text
    assert text == f"{path}: {err.reason}"
    return err


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny 1-bit PNG whose header declares width x height (the data does not matter: Pillow
    refuses a bomb when it reads the header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# --------------------------------------------------------------------------------------------
# Good files: formats


def test_rgb_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(quadrants()).save(path, quality=95)
    arr = assert_good(path, 64, 32)
    np.testing.assert_allclose(quadrant_means(arr), quadrant_means(quadrants()), atol=12)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("lossless.webp", {"lossless": True}),
        ("image.bmp", {}),
        ("image.tiff", {}),
        ("image.png", {}),
        ("image.ppm", {}),
    ],
)
def test_lossless_formats_exact(tmp_path: Path, name: str, kwargs: dict) -> None:
    path = tmp_path / name
    Image.fromarray(quadrants()).save(path, **kwargs)
    arr = assert_good(path, 64, 32)
    np.testing.assert_array_equal(arr, quadrants())


def test_lossy_webp(tmp_path: Path) -> None:
    path = tmp_path / "lossy.webp"
    Image.fromarray(quadrants()).save(path, quality=90)
    arr = assert_good(path, 64, 32)
    np.testing.assert_allclose(quadrant_means(arr), quadrant_means(quadrants()), atol=15)


def test_gif_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (20, 10), c) for c in ("red", "blue", "green")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    arr = assert_good(path, 20, 10)
    assert (arr == (255, 0, 0)).all()


def test_animated_webp_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.webp"
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2
    arr = assert_good(path, 20, 10)
    assert (arr == (255, 0, 0)).all()


def test_multipage_tiff_first_page(tmp_path: Path) -> None:
    path = tmp_path / "pages.tif"
    pages = [Image.new("RGB", (12, 6), c) for c in ((0, 255, 0), (255, 0, 0))]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    arr = assert_good(path, 12, 6)
    assert (arr == (0, 255, 0)).all()


def test_tiny_8x8(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(src).save(path)
    np.testing.assert_array_equal(assert_good(path, 8, 8), src)


def test_upper_case_extension(tmp_path: Path) -> None:
    path = tmp_path / "PHOTO.JPG"
    Image.fromarray(quadrants()).save(path, format="JPEG")
    assert_good(path, 64, 32)


def test_unicode_and_space_in_name(tmp_path: Path) -> None:
    path = tmp_path / "mon fötö 写真 (1).png"
    Image.fromarray(quadrants()).save(path)
    np.testing.assert_array_equal(assert_good(path, 64, 32), quadrants())


def test_content_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(quadrants()).save(path, format="PNG")
    np.testing.assert_array_equal(assert_good(path, 64, 32), quadrants())
    no_ext = tmp_path / "noextension"
    Image.fromarray(quadrants()).save(no_ext, format="BMP")
    np.testing.assert_array_equal(assert_good(no_ext, 64, 32), quadrants())


def test_returned_array_is_writable_and_owned(tmp_path: Path) -> None:
    path = tmp_path / "w.png"
    Image.fromarray(quadrants()).save(path)
    arr = load_image(path)
    arr[0, 0] = 0  # must not raise (a read-only view of a Pillow buffer would)


# --------------------------------------------------------------------------------------------
# Good files: modes


def test_palette_with_transparency_over_white(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    img.putpixel((1, 0), 1)
    img.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    arr = assert_good(path, 4, 2)
    assert tuple(arr[0, 1]) == (255, 0, 0)
    assert tuple(arr[0, 0]) == (255, 255, 255)  # transparent black -> white
    assert (arr[1] == 255).all()


def test_palette_with_partial_alpha(tmp_path: Path) -> None:
    path = tmp_path / "palette_alpha.png"
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    img.putpixel((1, 0), 1)
    img.save(path, transparency=bytes([0, 128]))  # index 0 clear, index 1 half transparent
    arr = assert_good(path, 2, 1)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert arr[0, 1, 0] == 255 and abs(int(arr[0, 1, 1]) - 127) <= 1


def test_rgb_png_with_colour_key(tmp_path: Path) -> None:
    path = tmp_path / "rgb_key.png"
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8)).save(
        path, transparency=(255, 0, 0))
    arr = assert_good(path, 2, 1)
    assert tuple(arr[0, 0]) == (255, 255, 255)  # the key colour is transparent
    assert tuple(arr[0, 1]) == (0, 0, 255)


def test_palette_without_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette_opaque.png"
    img = Image.new("P", (3, 1), 0)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    img.putpixel((2, 0), 1)
    img.save(path)
    arr = assert_good(path, 3, 1)
    assert tuple(arr[0, 0]) == (0, 0, 0)
    assert tuple(arr[0, 2]) == (10, 20, 30)


def test_gif_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "transparent.gif"
    img = Image.new("P", (4, 1), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.putpixel((3, 0), 1)
    img.save(path, transparency=0)
    arr = assert_good(path, 4, 1)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, 3]) == (0, 0, 255)


def test_rgba_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    src = np.array([[[255, 0, 0, 255], [255, 0, 0, 128], [255, 0, 0, 0], [0, 0, 0, 128]]],
                   dtype=np.uint8)
    Image.fromarray(src, "RGBA").save(path)
    arr = assert_good(path, 4, 1)
    assert tuple(arr[0, 0]) == (255, 0, 0)
    assert arr[0, 1, 0] == 255 and abs(int(arr[0, 1, 1]) - 127) <= 1
    assert arr[0, 1, 1] == arr[0, 1, 2]
    assert tuple(arr[0, 2]) == (255, 255, 255)  # fully transparent -> white, not red or black
    assert all(abs(int(v) - 127) <= 1 for v in arr[0, 3])


def test_la_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.fromarray(np.array([[[0, 255], [0, 0], [100, 255]]], dtype=np.uint8), "LA").save(path)
    arr = assert_good(path, 3, 1)
    assert tuple(arr[0, 0]) == (0, 0, 0)
    assert tuple(arr[0, 1]) == (255, 255, 255)
    assert tuple(arr[0, 2]) == (100, 100, 100)


def test_grayscale_l(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    src = np.arange(0, 256, 16, dtype=np.uint8).reshape(2, 8)
    Image.fromarray(src, "L").save(path)
    arr = assert_good(path, 8, 2)
    for c in range(3):
        np.testing.assert_array_equal(arr[:, :, c], src)


def test_grayscale_l_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "gray.jpg"
    Image.new("L", (16, 16), 200).save(path, quality=95)
    arr = assert_good(path, 16, 16)
    assert np.abs(arr.astype(int) - 200).max() <= 2


def test_bilevel_mode_1(tmp_path: Path) -> None:
    path = tmp_path / "bilevel.png"
    img = Image.new("1", (8, 2), 0)
    img.putpixel((3, 1), 1)
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "1"
    arr = assert_good(path, 8, 2)
    assert tuple(arr[1, 3]) == (255, 255, 255)
    assert arr.sum() == 3 * 255


def test_16bit_grayscale_png_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "gray16.png"
    src = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(src).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    arr = assert_good(path, 4, 1)
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    path = tmp_path / "gray16b.tif"
    raw = np.array([0, 32896, 65535], dtype=">u2").tobytes()
    Image.frombytes("I;16B", (3, 1), raw).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16B"
    arr = assert_good(path, 3, 1)
    assert arr[0, :, 0].tolist() == [0, 128, 255]


def test_32bit_int_tiff(tmp_path: Path) -> None:
    path = tmp_path / "int32.tif"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32)).save(path)
    with Image.open(path) as check:
        assert check.mode == "I"
    assert load_image(path)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "mode, raw, expected",
    [
        ("I;16", np.array([0, 257, 32896, 65535], "<u2"), [0, 1, 128, 255]),
        ("I;16B", np.array([0, 257, 32896, 65535], ">u2"), [0, 1, 128, 255]),
        ("I;16L", np.array([0, 257, 32896, 65535], "<u2"), [0, 1, 128, 255]),
        ("I", np.array([0, 257, 32896, 65535], "=i4"), [0, 1, 128, 255]),
        ("I", np.array([-5, 0, 2**30, 2**31 - 1], "=i4"), [0, 0, 128, 255]),
    ],
)
def test_integer_modes_in_memory(mode: str, raw: np.ndarray, expected: list[int]) -> None:
    img = Image.frombytes(mode, (len(raw), 1), raw.tobytes())
    arr = images._to_rgb_array(img)
    assert_rgb(arr, len(raw), 1)
    assert arr[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    "values, expected",
    [([0.0, 0.5, 1.0, -0.2], [0, 128, 255, 0]), ([0.0, 100.0, 300.0, -5.0], [0, 100, 255, 0])],
)
def test_float_tiff(tmp_path: Path, values: list[float], expected: list[int]) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([values], dtype=np.float32)).save(path)
    with Image.open(path) as check:
        assert check.mode == "F"
    assert load_image(path)[0, :, 0].tolist() == expected


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    img = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red
    img.paste((0, 0, 0, 255), (16, 0, 32, 16))  # black
    img.save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    arr = assert_good(path, 32, 16)
    np.testing.assert_allclose(arr[4:12, 2:12].reshape(-1, 3).mean(0), (255, 0, 0), atol=12)
    np.testing.assert_allclose(arr[4:12, 20:30].reshape(-1, 3).mean(0), (0, 0, 0), atol=12)


def test_lab_tiff(tmp_path: Path) -> None:
    path = tmp_path / "lab.tif"
    Image.fromarray(quadrants()).convert("LAB").save(path)
    with Image.open(path) as check:
        assert check.mode == "LAB"
    arr = assert_good(path, 64, 32)
    # 8-bit LAB cannot round-trip saturated sRGB exactly (about 20 levels off)
    np.testing.assert_allclose(quadrant_means(arr), quadrant_means(quadrants()), atol=25)


@pytest.mark.parametrize("mode", ["HSV", "YCbCr", "CMYK", "LAB", "RGBX", "RGBa", "PA"])
def test_other_modes_convert(mode: str) -> None:
    # modes that few formats can store: checked on the in-memory conversion
    src = Image.fromarray(quadrants())
    img = src.convert("P").convert("PA") if mode == "PA" else src.convert(mode)
    arr = images._to_rgb_array(img)
    assert_rgb(arr, 64, 32)
    np.testing.assert_allclose(quadrant_means(arr), quadrant_means(quadrants()),
                               atol=25 if mode == "LAB" else 8)


def test_premultiplied_la_over_white() -> None:
    img = Image.new("LA", (2, 1), (0, 0)).convert("La")  # Pillow has no La -> RGBA conversion
    arr = images._to_rgb_array(img)
    assert_rgb(arr, 2, 1)
    assert (arr == 255).all()


# --------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize("orientation, turns", [(6, -1), (8, 1), (3, 2)])
def test_exif_rotated_jpeg(tmp_path: Path, orientation: int, turns: int) -> None:
    path = tmp_path / f"rotated{orientation}.jpg"
    stored = quadrants(64, 32)
    Image.fromarray(stored).save(path, quality=95, exif=exif_with_orientation(orientation))
    displayed = np.rot90(stored, k=turns)  # k=-1: clockwise, as a viewer shows orientation 6
    h, w = displayed.shape[:2]
    arr = assert_good(path, w, h)
    if orientation in (6, 8):
        assert (w, h) == (32, 64)  # swapped
    np.testing.assert_allclose(quadrant_means(arr), quadrant_means(displayed), atol=12)


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "jpeg"])
def test_exif_rotated_tiff(tmp_path: Path, compression: str | None) -> None:
    # Pillow's TIFF plugin rotates by itself while loading (and reports the rotated size at
    # open): no double rotation, and read_image_size must agree
    path = tmp_path / "rotated.tif"
    kwargs: dict = {"tiffinfo": {0x0112: 6}}
    if compression:
        kwargs["compression"] = compression
    Image.fromarray(quadrants(64, 32)).save(path, **kwargs)
    arr = assert_good(path, 32, 64)
    np.testing.assert_allclose(quadrant_means(arr), quadrant_means(np.rot90(quadrants(), k=-1)),
                               atol=12)


def test_exif_rotated_png(tmp_path: Path) -> None:
    path = tmp_path / "rotated.png"
    Image.fromarray(quadrants(64, 32)).save(path, exif=exif_with_orientation(6))
    arr = assert_good(path, 32, 64)
    np.testing.assert_array_equal(arr, np.rot90(quadrants(64, 32), k=-1))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_stored_pixels_on_request(tmp_path: Path, suffix: str) -> None:
    # exif_orientation=False: the pixels as stored, for boxes annotated on them
    path = tmp_path / f"turned{suffix}"
    Image.fromarray(quadrants(64, 32)).save(path, exif=exif_with_orientation(6))
    arr = load_image(path, exif_orientation=False)
    assert_rgb(arr, 64, 32)
    np.testing.assert_allclose(quadrant_means(arr), quadrant_means(quadrants(64, 32)), atol=12)
    assert read_image_size(path, exif_orientation=False) == (64, 32)
    assert read_image_size(path) == (32, 64)


@pytest.mark.parametrize("orientation, annotated, expected", [
    (6, (64, 32), "stored"),   # the stored size: annotated on the stored pixels
    (8, (64, 32), "stored"),
    (6, (32, 64), "shown"),    # the turned size: annotated as a viewer shows it
    (6, (50, 50), "unknown"),  # neither (resized after annotating)
    (3, (64, 32), "unknown"),  # upside down: both frames are 64x32
    (1, (64, 32), "same"),
])
def test_annotated_frame(tmp_path: Path, orientation: int, annotated: tuple[int, int],
                         expected: str) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(quadrants(64, 32)).save(path, exif=exif_with_orientation(orientation))
    assert annotated_frame(path, *annotated) == expected


def test_annotated_frame_of_square_tiff_and_bad_files(tmp_path: Path) -> None:
    square = tmp_path / "square.jpg"
    Image.fromarray(quadrants(32, 32)).save(square, exif=exif_with_orientation(6))
    assert annotated_frame(square, 32, 32) == "unknown"        # both frames are 32x32
    tiff = tmp_path / "turned.tif"
    Image.fromarray(quadrants(64, 32)).save(tiff, tiffinfo={0x0112: 6})
    assert annotated_frame(tiff, 64, 32) == "same"             # Pillow turns TIFF itself
    assert_rgb(load_image(tiff, exif_orientation=False), 32, 64)
    assert read_image_size(tiff, exif_orientation=False) == (32, 64)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert annotated_frame(broken, 64, 32) == "same"           # the loader reports it
    assert annotated_frame(tmp_path / "missing.jpg", 64, 32) == "same"


def test_exif_after_image_data_in_png(tmp_path: Path) -> None:
    # an eXIf chunk after IDAT (allowed by the PNG spec): the size must still agree with load
    src = tmp_path / "src.png"
    Image.fromarray(quadrants(64, 32)).save(src, exif=exif_with_orientation(8))
    path = tmp_path / "late_exif.png"
    path.write_bytes(move_chunks_before_iend(src.read_bytes(), {b"eXIf"}))
    arr = assert_good(path, 32, 64)
    np.testing.assert_array_equal(arr, np.rot90(quadrants(64, 32), k=1))


XMP_ORIENTATION_8 = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
    'syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    'tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>'
)


def move_chunks_before_iend(data: bytes, kinds: set[bytes]) -> bytes:
    """Re-order a PNG so that the chunks of these kinds come after the image data."""
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos:pos + 12 + length])
        pos += 12 + length
    moved = [c for c in chunks if c[4:8] in kinds]
    assert moved
    rest = [c for c in chunks if c[4:8] not in kinds]
    return data[:8] + b"".join(rest[:-1] + moved + rest[-1:])


@pytest.mark.parametrize("late", [False, True])
def test_xmp_orientation_in_png(tmp_path: Path, late: bool) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP_ORIENTATION_8)
    info.add_text("Comment", "an unrelated text chunk")
    path = tmp_path / "xmp.png"
    Image.fromarray(quadrants(64, 32)).save(path, pnginfo=info)
    if late:
        path.write_bytes(move_chunks_before_iend(path.read_bytes(), {b"iTXt", b"tEXt"}))
    arr = assert_good(path, 32, 64)
    np.testing.assert_array_equal(arr, np.rot90(quadrants(64, 32), k=1))


@pytest.mark.parametrize("name, kwargs", [
    ("a.jpg", {"exif": exif_with_orientation(6)}),
    ("b.png", {"exif": exif_with_orientation(6)}),
    ("c.png", {}),
    ("d.webp", {"exif": exif_with_orientation(6)}),
    ("e.tif", {"tiffinfo": {0x0112: 6}}),
    ("f.gif", {}),
    ("g.bmp", {}),
])
def test_read_image_size_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            name: str, kwargs: dict) -> None:
    from PIL import ImageFile

    path = tmp_path / name
    Image.fromarray(quadrants(64, 32)).save(path, **kwargs)
    expected = (32, 64) if kwargs else (64, 32)
    assert read_image_size(path) == expected
    assert load_image(path).shape[:2] == expected[::-1]

    def no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert read_image_size(path) == expected


def test_no_exif_png_size_does_not_decode(tmp_path: Path) -> None:
    # read_image_size on a PNG without EXIF reads the header only: a truncated PNG still has a
    # size, while load_image refuses it
    src = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)) \
        .save(src)
    path = tmp_path / "cut.png"
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert read_image_size(path) == (64, 64)
    assert_load_error(path, "truncated or corrupt image data")


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00XX\x00\x2a\x00\x00\x00\x08",  # bad byte order
        b"Exif\x00\x00MM",  # cut short
        b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0",  # IFD offset beyond the block
        # orientation stored as the ASCII string "AB"
        b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x02\x00\x00\x00\x02AB\x00\x00",
    ],
)
def test_broken_exif_loads_unrotated(tmp_path: Path, exif: bytes) -> None:
    path = tmp_path / "broken_exif.jpg"
    Image.fromarray(quadrants(64, 32)).save(path, quality=95, exif=exif)
    arr = assert_good(path, 64, 32)
    np.testing.assert_allclose(quadrant_means(arr), quadrant_means(quadrants()), atol=12)


def test_broken_exif_under_warnings_as_errors(tmp_path: Path) -> None:
    # Pillow warns "Corrupt EXIF data" while opening; `python -W error` must not make it fatal
    import warnings

    path = tmp_path / "broken_exif.jpg"
    Image.fromarray(quadrants(64, 32)).save(path, exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_good(path, 64, 32)


def test_exif_that_raises_loads_unrotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "exif_raises.jpg"
    Image.fromarray(quadrants(64, 32)).save(path, quality=95, exif=exif_with_orientation(6))

    def broken_getexif(self: Image.Image) -> Image.Exif:
        raise SyntaxError("not a TIFF file (header b'garbage' not valid)")

    monkeypatch.setattr(Image.Image, "getexif", broken_getexif)
    arr = assert_good(path, 64, 32)
    np.testing.assert_allclose(quadrant_means(arr), quadrant_means(quadrants()), atol=12)


# --------------------------------------------------------------------------------------------
# Bad files


def good_jpeg_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "_noise.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    return path.read_bytes()


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_load_error(path, "empty file (0 bytes)")
    with pytest.raises(ImageLoadError, match="empty file"):
        read_image_size(path)
    assert not is_image_file(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = good_jpeg_bytes(tmp_path)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    err = assert_load_error(path, "truncated or corrupt image data: ")
    assert len(err.reason) > len("truncated or corrupt image data: ")  # Pillow's message follows
    assert read_image_size(path) == (64, 64)  # the header is intact
    assert is_image_file(path)  # recognised by content; load_image says why it cannot load it


def test_corrupt_png_data(tmp_path: Path) -> None:
    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)) \
        .save(src)
    data = bytearray(src.read_bytes())
    start = data.index(b"IDAT") + 20
    data[start:start + 40] = bytes(40)  # zero out compressed data: CRC / zlib failure
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    assert_load_error(path, "truncated or corrupt image data")


def test_only_a_header(tmp_path: Path) -> None:
    data = good_jpeg_bytes(tmp_path)
    path = tmp_path / "header_only.jpg"
    path.write_bytes(data[:20])
    assert_load_error(path, "truncated or corrupt image data: cannot read the JPEG header")
    assert not is_image_file(path)  # Pillow cannot identify it


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20, encoding="utf-8")
    assert_load_error(path, "not a recognised image format")
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        read_image_size(path)
    assert not is_image_file(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.png"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_load_error(path, "not a recognised image format")
    assert not is_image_file(path)


def test_directory_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.mkdir()
    assert_load_error(path, "is a directory")
    with pytest.raises(ImageLoadError, match="is a directory"):
        read_image_size(path)
    assert not is_image_file(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.jpg"
    assert_load_error(path, "no such file")
    with pytest.raises(ImageLoadError, match="no such file"):
        read_image_size(path)
    assert not is_image_file(path)
    below_a_file = tmp_path / "file.txt"
    below_a_file.write_text("x")
    assert_load_error(below_a_file / "img.jpg", "no such file")
    assert not is_image_file(below_a_file / "img.jpg")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    assert_load_error(path, "not a regular file")
    assert not is_image_file(path)


def test_permission_denied_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.png"
    Image.fromarray(quadrants()).save(path)

    def deny(p: object) -> None:
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(images, "_open_binary", deny)
    assert_load_error(path, "permission denied")
    with pytest.raises(ImageLoadError, match="permission denied"):
        read_image_size(path)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="file modes do not restrict root (or Windows)")
def test_permission_denied_real(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    Image.fromarray(quadrants()).save(path)
    path.chmod(0)
    try:
        assert_load_error(path, "permission denied")
        assert not is_image_file(path)
    finally:
        path.chmod(0o644)


def test_decompression_bomb_error_range(tmp_path: Path) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    side = int((3 * limit) ** 0.5) + 1  # over twice the limit: Pillow raises
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    assert path.stat().st_size < 200
    err = assert_load_error(path, "decompression bomb")
    assert f"{side * side} pixels is over the limit of {limit}" in err.reason
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        read_image_size(path)
    assert is_image_file(path)
    assert Image.MAX_IMAGE_PIXELS == limit  # untouched


def test_decompression_bomb_warning_range(tmp_path: Path) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    side = int((1.5 * limit) ** 0.5)  # between the limit and twice it: Pillow only warns
    assert limit < side * side < 2 * limit
    path = tmp_path / "bomb_warn.png"
    path.write_bytes(png_header_only(side, side))
    err = assert_load_error(path, "decompression bomb")
    assert f"{side * side} pixels is over the limit of {limit}" in err.reason
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        read_image_size(path)
    assert is_image_file(path)


@pytest.mark.parametrize("side, fmt", [(40, "PNG"), (50, "PNG"), (40, "GIF"), (50, "JPEG")])
def test_decompression_bomb_with_lowered_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               side: int, fmt: str) -> None:
    path = tmp_path / f"small_bomb_{side}.{fmt.lower()}"
    Image.new("RGB", (side, side), "red").save(path, format=fmt)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600: warning range, 2500: error
    err = assert_load_error(path, "decompression bomb")
    assert err.reason == f"decompression bomb: {side * side} pixels is over the limit of 1000"
    assert is_image_file(path)


def test_no_decompression_bomb_warning_escapes(tmp_path: Path) -> None:
    import warnings

    limit = Image.MAX_IMAGE_PIXELS
    side = int((1.5 * limit) ** 0.5)
    path = tmp_path / "bomb_warn.png"
    path.write_bytes(png_header_only(side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError):
            load_image(path)
        assert is_image_file(path)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    # and the global filters are as before: Pillow still only warns outside our functions
    with pytest.warns(Image.DecompressionBombWarning):
        with Image.open(path):
            pass


def test_bad_files_leave_no_open_handles(tmp_path: Path) -> None:
    import gc
    import warnings

    bad = tmp_path / "notes.jpg"
    bad.write_text("hello\n" * 10)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20000, 20000))
    data = good_jpeg_bytes(tmp_path)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    good = tmp_path / "good.png"
    Image.fromarray(quadrants()).save(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        for path in (bad, bomb, cut):
            with pytest.raises(ImageLoadError):
                load_image(path)
            is_image_file(path)
        load_image(good)
        read_image_size(good)
        gc.collect()
