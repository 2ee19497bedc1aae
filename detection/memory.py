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
import os
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


# oneDNN (PyTorch's CPU convolutions) keeps each primitive it builds, one per layer and input
# shape, up to 1024 of them by default, with memory of its own. SPP-net runs the conv layers at
# 8 scales of images of every size, so each new image size adds primitives: on this project's
# 2-core CPU, the `small` trunk at 8 scales on 60 images of distinct widths grew the resident
# memory from 0.87 to 1.66 GB (and still growing) with the default, and kept it at 0.89 GB
# with 64, in the same time; with gradients (SPP-net's `--finetune-conv`), 30 distinct sizes
# took it from 1.0 to 2.0 GB, against 1.25 GB with 64.
ONEDNN_PRIMITIVE_CACHE = 64


def bound_onednn_primitive_cache(capacity: int = ONEDNN_PRIMITIVE_CACHE) -> bool:
    """Cap oneDNN's primitive cache at `capacity` unless the user set
    `ONEDNN_PRIMITIVE_CACHE_CAPACITY`; True when this call set it. oneDNN reads the variable
    when it builds its first primitive, so this must run before the first convolution."""
    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in os.environ:
        return False
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
    return True
