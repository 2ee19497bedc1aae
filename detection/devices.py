"""The compute device: CUDA when available, else the CPU, or what `--device` names."""

from __future__ import annotations

import torch

from data.errors import SppnetError


def resolve_device(name: str | None = None) -> torch.device:
    """`None`/"auto" -> cuda if available else cpu; "cpu", "cuda", "cuda:1", "mps" as given, with a
    one-line error when that device is not there."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SppnetError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SppnetError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise SppnetError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SppnetError(f"--device {name}: MPS is not available on this machine")
    return device
