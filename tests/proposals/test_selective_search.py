"""Selective search: determinism whatever ran before, box format, dedupe, min size, downscale."""

from __future__ import annotations

import ctypes

import cv2
import numpy as np
import pytest

import proposals.selective_search as ss
from data.errors import SppnetError
from proposals.selective_search import (ProposalSettings, rects_to_boxes, search_image_size,
                                        selective_search)


def test_same_boxes_in_both_orders_and_after_other_rand_use(draw):
    a, _ = draw(0)
    b, _ = draw(1)
    first_a = selective_search(a)
    first_b = selective_search(b)
    ss._load_libc().srand(12345)          # someone else uses the C library's RNG
    for _ in range(7):
        ss._load_libc().rand()
    second_b = selective_search(b)
    second_a = selective_search(a)
    assert len(first_a) > 10 and len(first_b) > 10
    np.testing.assert_array_equal(first_a, second_a)
    np.testing.assert_array_equal(first_b, second_b)


def test_unseeded_opencv_order_changes_so_seeding_matters(draw):
    """The pitfall itself: another srand before OpenCV changes its ranking (else the test above
    would prove nothing)."""
    image, _ = draw(0)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    orders = []
    for seed in (1, 2):
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(bgr)
        search.switchToSelectiveSearchFast()
        ss._load_libc().srand(seed)
        orders.append(np.asarray(search.process()))
    assert sorted(map(tuple, orders[0])) == sorted(map(tuple, orders[1]))  # same set of rects
    assert not np.array_equal(orders[0], orders[1])                         # another order


def test_box_format_dedupe_min_size_and_cap(draw):
    image, _ = draw(3)
    boxes = selective_search(image, ProposalSettings(min_size=12, max_proposals=40))
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert 0 < len(boxes) <= 40
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert boxes.min() >= 0 and (boxes[:, [0, 2]] <= 199).all() and (boxes[:, [1, 3]] <= 149).all()
    sizes = boxes[:, 2:] - boxes[:, :2] + 1
    assert (sizes >= 12).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    assert (boxes == np.round(boxes)).all()   # not downscaled: integer pixel boxes
    full = selective_search(image, ProposalSettings(min_size=12))
    np.testing.assert_array_equal(boxes, full[:40])   # the cap keeps the best ranked


def test_whole_image_rect_is_the_whole_image_box(draw):
    image, _ = draw(0)
    boxes = selective_search(image)
    assert [0, 0, 199, 149] in boxes.tolist()   # (x, y, w, h) = (0, 0, 200, 150) -> x2 = x + w - 1


def test_rects_to_boxes_by_hand():
    rects = np.array([[10, 10, 30, 20],     # kept
                      [0, 0, 5, 40],        # too narrow
                      [10, 10, 30, 20],     # duplicate of the first
                      [50, 40, 50, 35],     # kept, clipped at the bottom right
                      [1, 2, 20, 20]])
    boxes = rects_to_boxes(rects, (100, 75), (100, 75), min_size=10, max_proposals=10)
    np.testing.assert_array_equal(boxes, [[10, 10, 39, 29], [50, 40, 99, 74], [1, 2, 20, 21]])
    scaled = rects_to_boxes(rects, (100, 75), (200, 150), min_size=10, max_proposals=2)
    np.testing.assert_array_equal(scaled, [[20, 20, 79, 59], [100, 80, 199, 149]])
    assert rects_to_boxes(np.zeros((0, 4)), (10, 10), (10, 10), 0, 5).shape == (0, 4)


def test_search_image_size():
    assert search_image_size(500, 375, 500) == (500, 375)
    assert search_image_size(1000, 750, 500) == (500, 375)
    assert search_image_size(300, 1200, 500) == (125, 500)
    assert search_image_size(4000, 3000, None) == (4000, 3000)
    assert search_image_size(100, 80, 500) == (100, 80)   # never upscaled


def test_downscaled_search_scales_boxes_back(draw):
    small, _ = draw(4, width=200, height=150)
    big = cv2.resize(small, (400, 300), interpolation=cv2.INTER_NEAREST)
    settings = ProposalSettings(max_side=200, min_size=10)
    boxes = selective_search(big, settings)
    searched = cv2.resize(big, (200, 150), interpolation=cv2.INTER_AREA)
    expected = selective_search(searched, ProposalSettings(max_side=None, min_size=10))
    # pixel span [x, x + w) doubles: x1 -> 2 x1, x2 -> 2 (x2 + 1) - 1
    np.testing.assert_array_equal(boxes, expected * 2 + np.array([0, 0, 1, 1], np.float32))
    assert boxes[:, [0, 2]].max() <= 399 and boxes[:, [1, 3]].max() <= 299


def test_settings_key_is_stable_and_changes_with_every_field():
    base = ProposalSettings()
    assert base.key() == ProposalSettings().key() and len(base.key()) == 16
    assert base.key() == "4ca1866846111513"    # a cache written today is found tomorrow
    variants = [ProposalSettings(mode="quality"), ProposalSettings(max_proposals=1000),
                ProposalSettings(min_size=10), ProposalSettings(max_side=None),
                ProposalSettings(max_side=600), ProposalSettings(k=100),
                ProposalSettings(k_step=100), ProposalSettings(sigma=0.5), ProposalSettings(seed=2)]
    keys = {v.key() for v in variants}
    assert len(keys) == len(variants) and base.key() not in keys


@pytest.mark.parametrize("bad", [dict(mode="slow"), dict(max_proposals=0), dict(min_size=-1),
                                 dict(max_side=3), dict(sigma=0), dict(seed=-1)])
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(SppnetError):
        ProposalSettings(**bad)


def test_missing_ximgproc_names_the_fix(monkeypatch, draw):
    monkeypatch.delattr(cv2, "ximgproc")
    with pytest.raises(SppnetError, match="opencv-contrib-python-headless") as info:
        ss._run_opencv(np.zeros((20, 20, 3), np.uint8), ProposalSettings())
    assert "uninstall" in str(info.value)


def test_no_c_library_is_a_clear_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("not here")

    monkeypatch.setattr(ss, "_libc", None)
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    with pytest.raises(SppnetError, match="srand"):
        ss._load_libc()


def test_rejects_non_rgb_input():
    with pytest.raises(ValueError):
        selective_search(np.zeros((10, 10), np.uint8))
