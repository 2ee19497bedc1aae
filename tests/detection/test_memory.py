"""release_free_memory: the heap's free pages go back to the system, and nothing breaks where
the C library cannot."""

from __future__ import annotations

import os
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


_CONV_AT_MANY_SIZES = """
import sys
import numpy as np, torch
from detection.memory import bound_onednn_primitive_cache
if sys.argv[1] == "bound":
    bound_onednn_primitive_cache()
from detection.backbones import build_net
from detection.features import conv_maps
import ctypes
libc = ctypes.CDLL("libc.so.6")
def resident():
    libc.malloc_trim(0)                 # freed heap back to the system: live memory only
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
net = build_net("zf5_small", None, seed=0).eval()
with torch.inference_mode():
    for i in range(80):
        conv_maps(net, np.zeros((200, 201 + i, 3), np.uint8), (200, 300, 400), 1600)
        if i == 39:
            half = resident()
print(resident() - half)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or not torch.backends.mkldnn.is_available(),
                    reason="reads /proc; needs oneDNN")
def test_bounded_onednn_cache_keeps_memory_flat_over_many_image_sizes(tmp_path):
    """The conv layers on 80 image sizes at 3 scales: over the last 40 sizes, with oneDNN's
    default cache the live memory grows by about 16 MB (a primitive kept per shape); bounded,
    with the cache full since, by about 5. Freed heap is trimmed before each reading: without
    that, what the allocator kept swamped the cache (default 58-120 MB, bound 5-55 MB), and
    over all 80 sizes the cache's own filling left too little margin."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    env["OMP_NUM_THREADS"] = "1"
    grown = {how: int(subprocess.run([sys.executable, "-c", _CONV_AT_MANY_SIZES, how],
                                     capture_output=True, text=True, check=True, env=env,
                                     cwd=Path(__file__).resolve().parents[2]).stdout)
             for how in ("default", "bound")}
    assert grown["bound"] < grown["default"] / 2


def test_the_users_onednn_cache_setting_wins(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    assert memory.bound_onednn_primitive_cache() is False
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert memory.bound_onednn_primitive_cache(32) is True
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
