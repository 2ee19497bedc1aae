"""release_free_memory: the heap's free pages go back to the system, and nothing breaks where
the C library cannot."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from detection import memory
from detection.memory import release_free_memory


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.skipif(memory._malloc_trim() is None, reason="no malloc_trim in this C library")
def test_freed_tensors_pinned_between_kept_ones_go_back_to_the_system():
    # 64 KiB tensors (below glibc's mmap threshold, so in the heap) with a small tensor kept
    # after each: freeing the big ones leaves ~125 MiB free in the heap, in pieces, which
    # glibc keeps resident until asked
    kept, freed = [], []
    for _ in range(2000):
        freed.append(torch.ones(16 * 1024))
        kept.append(torch.ones(64))
    del freed
    before = resident_bytes()
    assert release_free_memory()
    returned = before - resident_bytes()
    assert returned > 60 * 2 ** 20, f"only {returned / 2 ** 20:.0f} MiB returned"
    assert all(float(t.sum()) == 64 for t in kept)       # the live tensors are untouched


def test_without_malloc_trim_it_does_nothing(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert release_free_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is Linux's")
def test_found_on_linux_with_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert memory._malloc_trim() is not None


def test_a_conv_loop_releases_every_few_images(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(1) or True)
    released = [memory.release_now_and_then(done, every=4) for done in range(0, 13)]
    assert released == [False, False, False, False, True] + [False] * 3 + [True] + \
        [False] * 3 + [True]
    assert len(calls) == 3
