"""Hand the C heap's free memory back to the system between the stages of a long run.

glibc keeps the memory PyTorch frees (conv activations at every image size, the crops of the
pre-training) in its heap for reuse, and the tensors kept alive in between (the conv5 maps) pin
it there in pieces, so the resident memory of `sppnet train` grew stage by stage although the
live data did not: on the demo set, computing the flipped images' conv5 maps left 2.30 GB
resident of which `malloc_trim` gave back 0.81 GB. `release_free_memory` returns such pages
at the end of a stage, and `release_now_and_then` every few images (or steps) inside the loops
that run the conv layers at many sizes; where the C library has no `malloc_trim` (macOS,
Windows, musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import sys
from functools import lru_cache
from typing import Callable


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the process's C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim     # the symbols the process already has loaded
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the heap's free pages to the system (`malloc_trim(0)`); True when some were
    returned, False when none were or the C library cannot."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


RELEASE_EVERY = 16   # images between two releases in a conv loop: one costs ~0.1 s per GB returned


def release_now_and_then(done: int, every: int = RELEASE_EVERY) -> bool:
    """`release_free_memory` after every `every`-th image (or step) of a loop (`done`: how many
    are finished so far); what it returned, False between."""
    return release_free_memory() if done > 0 and done % every == 0 else False
