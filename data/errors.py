"""The one exception family that the CLI turns into a one-line message.

Everything a user can cause with bad input (a broken image, a malformed annotation, a wrong path)
raises a subclass of `SppnetError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class SppnetError(Exception):
    """A user-facing error: its `str` is a complete one-line message."""


class FileError(SppnetError):
    """A problem with one file: carries the file and the reason, printed as `file: reason`."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.path}: {self.reason}")


class ImageLoadError(FileError):
    """An image file that cannot be read as an image (missing, empty, truncated, a bomb, ...)."""


class AnnotationError(FileError):
    """A VOC annotation or image-set file that is missing or malformed."""


class ResultFileError(FileError):
    """A detection result file with a malformed line."""
