"""Fixtures shared by the detection tests."""

from __future__ import annotations

import pytest

from detection.backbones import build_net


@pytest.fixture(scope="module")
def net():
    """The small preset's ZF-5 with seeded random weights and a 99 px R-CNN crop."""
    return build_net("zf5_small", seed=0, crop_size=99)
