"""Robust image loading: any file a user may hand us becomes an RGB uint8 array or one clear error.

Used everywhere images are read (training, proposals, `detect` on a folder of real-world files).

- `load_image(path)`: HxWx3 uint8 RGB, C-contiguous, EXIF orientation applied, alpha composited
  over white, every Pillow mode mapped to RGB (16-bit and float data scaled, not clipped), first
  frame of a multi-frame file.
- `read_image_size(path)`: (width, height) as `load_image` would return it, from the header.
- `is_image_file(path)`: whether Pillow recognises the content (the extension is ignored).
- `annotated_frame(path, width, height)`: whether an annotation of that size was made on the
  image as its EXIF orientation shows it or on the pixels as stored (annotation tools differ:
  some turn photos by their EXIF tag, some do not), as far as the size tells;
  `load_image(path, exif_orientation=False)` reads the stored pixels, so that boxes annotated
  on them line up.

Every failure of `load_image` / `read_image_size` is an `ImageLoadError(path, reason)` with a short,
one-line reason. Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is respected and
never changed: images above it (Pillow's warning range included) are refused. Truncated files are
refused too (`ImageFile.LOAD_TRUNCATED_IMAGES` is left False and the image is fully decoded).
"""

from __future__ import annotations

import os
import re
import stat
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from data.errors import ImageLoadError

__all__ = ["load_image", "read_image_size", "is_image_file", "annotated_frame"]

# EXIF orientation -> the transpose that undoes it (the table of ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}

# Errors Pillow raises from broken data (besides its own DecompressionBomb* and Unidentified*).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError,
                  TypeError, KeyError, zlib.error, RuntimeError)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# Public API


def load_image(path: str | Path, *, exif_orientation: bool = True) -> np.ndarray:
    """Load an image file as an RGB uint8 array of shape (H, W, 3), C-contiguous.

    EXIF orientation is applied unless `exif_orientation` is False (a broken EXIF block leaves
    the image un-rotated; Pillow orients TIFF files itself while decoding them), transparency
    is composited over white, 16-bit / 32-bit integer data is scaled by its bit depth and float
    data from [0, 1] or [0, 255]; multi-frame files give their first frame.

    Raises:
        ImageLoadError: for any file that cannot be read as an image (missing, a directory,
            empty, not an image, truncated or corrupt, permission denied, a decompression bomb).
    """
    with _opened(path) as img:
        try:
            with _pillow_warnings():
                img.load()  # full decode: a truncated file fails here, not later
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # some plugins (GIF, TIFF tiles, ICO, ...) check sizes again while decoding
            raise ImageLoadError(path, _bomb_reason(exc)) from None
        except MemoryError:
            raise ImageLoadError(path, f"not enough memory to decode a {img.width}x{img.height} "
                                       "image") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt data
            raise ImageLoadError(path, f"truncated or corrupt image data: {_message(exc)}") \
                from exc
        oriented = _apply_exif_orientation(img) if exif_orientation else img
        try:
            array = _to_rgb_array(oriented)
        except MemoryError:
            raise ImageLoadError(path, f"not enough memory to convert a {img.width}x"
                                       f"{img.height} image") from None
        except _DECODE_ERRORS as exc:
            raise ImageLoadError(path, f"cannot convert image mode {oriented.mode!r} to RGB: "
                                       f"{_message(exc)}") from exc
    return array


def read_image_size(path: str | Path, *, exif_orientation: bool = True) -> tuple[int, int]:
    """Return (width, height) of the image as `load_image(path, exif_orientation=...)` would
    return it, reading only the header where possible (the pixel data is not decoded, except
    for a PNG that stores its EXIF block after the image data).

    Raises:
        ImageLoadError: as `load_image`, for every problem visible without decoding the pixels.
    """
    with _opened(path) as img:
        if not exif_orientation and img.format != "TIFF":
            return img.size
        width, height = _stored_size(img)
        if _exif_orientation(img, path) in _SWAPS_AXES:
            width, height = height, width
    return int(width), int(height)


def annotated_frame(path: str | Path, width: int, height: int
                    ) -> Literal["shown", "stored", "same", "unknown"]:
    """Which pixels boxes annotated on a `width` x `height` image belong to, as far as the sizes
    tell: "stored" when the EXIF orientation turns the image by 90 degrees and `width` x
    `height` is the stored size, "shown" when it is the turned size, "same" when there is
    nothing to tell apart (no orientation; TIFF, which Pillow orients while decoding; a file
    that cannot be read, which `load_image` reports), "unknown" when the file is oriented but
    the size cannot tell (a square image, a flip or half turn, a size that is neither frame's)."""
    try:
        with _opened(path) as img:
            orientation = 1 if img.format == "TIFF" else _exif_orientation(img, path)
            stored = _stored_size(img)
    except ImageLoadError:
        return "same"
    if orientation == 1:
        return "same"
    turned = (stored[1], stored[0]) if orientation in _SWAPS_AXES else stored
    if stored == turned or (width, height) not in (stored, turned):
        return "unknown"
    return "shown" if (width, height) == turned else "stored"


def is_image_file(path: str | Path) -> bool:
    """True when the file's content is an image format Pillow recognises, whatever its name.

    False for missing paths, directories, empty or unreadable files and non-image content.
    Only the header is read: a recognised but truncated file, or one over the decompression-bomb
    limit, is still an image file here (and `load_image` then explains why it cannot load it).
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return False
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(fh):
                return True
    except Image.DecompressionBombError:
        return True  # identified; just too big to load
    except Exception:  # noqa: BLE001 - anything else means "not something we can use"
        return False


# --------------------------------------------------------------------------------------------
# Opening


@contextmanager
def _opened(path: str | Path) -> Iterator[Image.Image]:
    """Check the path, open it and identify the image (header only); every failure is an
    ImageLoadError. The file is closed on exit."""
    _check_path(path)
    try:
        fh = _open_binary(path)
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot open file: {exc.strerror or _message(exc)}") \
            from None
    with fh:
        try:
            with _pillow_warnings():
                # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; refuse those too.
                img = Image.open(fh)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(path, _bomb_reason(exc)) from None
        except UnidentifiedImageError:
            kind = _signature_format(fh)
            if kind is None:
                raise ImageLoadError(path, "not a recognised image format") from None
            raise ImageLoadError(path, "truncated or corrupt image data: cannot read the "
                                       f"{kind} header") from None
        except MemoryError:
            raise ImageLoadError(path, "not enough memory to read the image header") from None
        except Exception as exc:  # noqa: BLE001 - a plugin failing on a broken header
            raise ImageLoadError(path, f"truncated or corrupt image data: {_message(exc)}") \
                from exc
        with img:
            # belt and braces: the warning filter above is process-wide state that another
            # thread could reset, so check the limit here too
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise ImageLoadError(path, f"decompression bomb: {img.width * img.height} "
                                           f"pixels is over the limit of {limit}")
            yield img


@contextmanager
def _pillow_warnings() -> Iterator[None]:
    """Local warning filters around Pillow calls (the global filters are never changed):
    the decompression-bomb warning becomes an error (we refuse those images), and Pillow's
    UserWarnings about corrupt metadata ("Corrupt EXIF data", ...) are silenced, since we handle
    broken metadata ourselves and they must not become errors under `-W error`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def _open_binary(path: str | Path) -> BinaryIO:
    """Open the file for reading (a separate function so tests can simulate OS errors)."""
    return open(path, "rb")


def _check_path(path: str | Path) -> None:
    """Refuse, with a clear reason, anything that is not a non-empty regular file."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageLoadError(path, "no such file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL byte in the path
        raise ImageLoadError(path, f"cannot access file: {_message(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(path, "not a regular file")  # a FIFO would block, a device is huge
    if st.st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")


# Magic numbers of common formats: a file that starts like one but that Pillow cannot identify
# has a broken header (e.g. a download cut after a few bytes), not an unknown format.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (_PNG_SIGNATURE, "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _signature_format(fh: BinaryIO) -> str | None:
    """The format whose magic number starts the file, if it is a common one."""
    try:
        fh.seek(0)
        head = fh.read(16)
    except (OSError, ValueError):
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    for magic, name in _SIGNATURES:
        if head.startswith(magic) and len(head) > len(magic):
            return name
    return None


def _bomb_reason(exc: BaseException) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match is None:
        return f"decompression bomb: over the limit of {limit} pixels"
    return f"decompression bomb: {match.group(1)} pixels is over the limit of {limit}"


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# EXIF orientation


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as stored in the file, before any EXIF orientation.

    Pillow's TIFF plugin (recent versions) reports the already-oriented size at open and
    applies the orientation itself while loading; its tags still hold the stored size.
    """
    if img.format == "TIFF":
        try:
            tags = img.tag_v2  # type: ignore[attr-defined]
            return int(tags[256]), int(tags[257])  # ImageWidth, ImageLength
        except Exception:  # noqa: BLE001 - fall back to what Pillow reports
            pass
    return img.size


def _exif_orientation(img: Image.Image, path: str | Path | None = None) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 when absent or unreadable.

    Pillow also takes it from an XMP packet or an ImageMagick "Raw profile type exif" text chunk.
    With `path`, a PNG is not decoded unless such metadata follows its image data (Pillow's
    `PngImageFile.getexif` would decode every PNG that has no eXIf chunk before it).
    """
    try:
        with _pillow_warnings():
            if (path is not None and img.format == "PNG" and "exif" not in img.info
                    and not _png_has_late_metadata(path)):
                exif = Image.Image.getexif(img)  # header metadata only, no decode
            else:
                exif = img.getexif()
            value = int(exif.get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block: treat as un-rotated
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """The loaded image with its EXIF orientation applied; un-rotated if the EXIF is broken.
    Returns `img` itself (no copy) when there is nothing to do."""
    orientation = _exif_orientation(img)
    if orientation == 1:
        return img
    try:
        with _pillow_warnings():
            return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - e.g. failing to rewrite the EXIF block after transposing
        return img.transpose(_ORIENTATION_TRANSPOSE[orientation])


# Text chunks whose keyword Pillow reads an orientation from.
_PNG_ORIENTATION_KEYWORDS = (b"Raw profile type exif", b"XML:com.adobe.xmp")


def _png_has_late_metadata(path: str | Path) -> bool:
    """Whether a PNG has orientation metadata (an eXIf chunk, or an XMP / raw-EXIF text chunk)
    after its image data, found by walking the chunk headers and seeking over the data (nothing
    is decoded). False on any problem."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != _PNG_SIGNATURE:
                return False
            seen_idat = False
            while True:
                header = fh.read(8)
                if len(header) < 8:
                    return False
                length, kind = struct.unpack(">I4s", header)
                if kind == b"IEND":
                    return False
                if kind == b"IDAT":
                    seen_idat = True
                elif seen_idat and kind == b"eXIf":
                    return True
                elif seen_idat and kind in (b"tEXt", b"zTXt", b"iTXt"):
                    keyword = fh.read(min(length, 80)).split(b"\0", 1)[0]
                    if keyword in _PNG_ORIENTATION_KEYWORDS:
                        return True
                    fh.seek(length - min(length, 80), os.SEEK_CUR)
                    length = 0
                fh.seek(length + 4, os.SEEK_CUR)  # data + CRC
    except (OSError, struct.error, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Modes -> RGB


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow mode as an (H, W, 3) uint8 RGB array, C-contiguous."""
    mode = img.mode
    if mode == "I" or mode.startswith(("I;16", "I;32")):
        return _gray_to_rgb(_integer_to_uint8(_integer_values(img)))
    if mode == "F":
        gray = _float_to_uint8(np.asarray(img, dtype=np.float32))
        return _gray_to_rgb(gray)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or _has_transparency(img):
        if mode == "La":  # premultiplied: Pillow has no direct La -> RGBA conversion
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    array = np.array(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:  # defensive: never hand back another shape
        raise ValueError(f"unexpected array shape {array.shape}")
    return np.ascontiguousarray(array)


def _has_transparency(img: Image.Image) -> bool:
    """A palette / L / RGB image with a transparency key (e.g. a GIF or PNG tRNS chunk)."""
    return img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info


def _integer_values(img: Image.Image) -> np.ndarray:
    """The integer gray values of an I / I;16* / I;32* image as a numpy array."""
    try:
        values = np.asarray(img)
    except Exception:  # noqa: BLE001 - a raw mode without an array interface
        values = np.asarray(img.convert("I"))
    if values.ndim != 2 or values.dtype.kind not in "iu":
        values = np.asarray(img.convert("I"))
    return values


def _integer_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale integer gray data by its bit depth to 0..255, never clipping the top of the range.

    16-bit data (uint16 arrays, and int32 "I" arrays whose values fit 0..65535, which is how
    Pillow has long stored 16-bit PNG / TIFF data) is divided by 257, so 65535 -> 255 and
    32896 -> 128; signed 16-bit data by 32767 / 255; wider int32 data by (2**31 - 1) / 255.
    Negative values become 0.
    """
    if values.dtype == np.uint16 or values.dtype == np.dtype(">u2"):
        top = 65535.0
    elif values.dtype.itemsize == 2:  # signed 16-bit
        top = 32767.0
    elif values.size == 0 or int(values.max()) <= 65535:
        top = 65535.0
    else:
        top = float(2**31 - 1) if values.dtype.kind == "i" else float(2**32 - 1)
    scaled = np.clip(values.astype(np.float64), 0.0, top) * (255.0 / top)
    return np.rint(scaled).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float gray data: [0, 1] scaled to 0..255 when the maximum is at most 1, else clipped to
    0..255. NaN becomes 0."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=np.inf, neginf=0.0)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.max() <= 1.0:
        values = np.clip(values, 0.0, 1.0) * 255.0
    return np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
