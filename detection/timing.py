"""Stage timers for the paper's per-image table: wall time of named stages, with the device
synchronised before each reading so that GPU work is counted where it runs."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued work on `device` (a no-op on the CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is not None and device.type == "mps":
        torch.mps.synchronize()


class StageTimer:
    """Accumulates seconds per stage name; `with timer.stage("conv"): ...`."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> None:
        """Forget all stages."""
        self.seconds.clear()


class NullTimer(StageTimer):
    """A timer that measures nothing and adds no synchronisation."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield
