"""Per-class ridge bounding-box regression on synthetic data where the deltas are linear in the
features."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from detection.bbox_regression import BoxRegressor, _Reservoir
from detection.boxes import apply_deltas, box_deltas, pixel_iou

D, K = 16, 3


def _true_model(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per class `W [K, 4, D]`, `b [K, 4]`: deltas of a proposal = W[c] @ x + b[c]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 0.03, size=(K, 4, D))
    b = rng.normal(0.0, 0.02, size=(K, 4))
    return w, b


def _image(rng: np.random.Generator, w: np.ndarray, b: np.ndarray, classes=(1, 2, 3),
           per_box: int = 40, noise: float = 1e-3):
    """One image: a ground-truth box per class in `classes`, far apart, and `per_box` proposals
    around each whose deltas to it are the linear model of their (slightly noisy) features."""
    gt, labels, props, feats = [], [], [], []
    for i, c in enumerate(classes):
        x1, y1 = 300.0 * i + rng.uniform(0, 50), rng.uniform(0, 50)
        g = np.array([x1, y1, x1 + rng.uniform(60, 200), y1 + rng.uniform(60, 200)])
        x = rng.normal(0.0, 1.0, size=(per_box, D))
        d = x @ w[c - 1].T + b[c - 1]
        # The proposal p whose deltas to g are d (box_deltas inverted on p).
        gw, gh = g[2] - g[0] + 1, g[3] - g[1] + 1
        gx, gy = g[0] + 0.5 * gw, g[1] + 0.5 * gh
        pw, ph = gw / np.exp(d[:, 2]), gh / np.exp(d[:, 3])
        px, py = gx - d[:, 0] * pw, gy - d[:, 1] * ph
        p = np.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw - 1, py + 0.5 * ph - 1], 1)
        gt.append(g)
        labels.append(c)
        props.append(p)
        feats.append(x + rng.normal(0.0, noise, size=x.shape))
    return (np.concatenate(feats).astype(np.float32), np.concatenate(props).astype(np.float32),
            np.array(gt, np.float32), np.array(labels))


@pytest.fixture(scope="module")
def fitted():
    w, b = _true_model()
    rng = np.random.default_rng(0)
    reg = BoxRegressor(num_classes=K)
    for _ in range(15):
        reg.add(*_image(rng, w, b))
    reg.fit()
    test = [_image(rng, w, b) for _ in range(3)]
    return reg, test


def test_deltas_are_exactly_the_model():
    w, b = _true_model()
    feats, props, gt, labels = _image(np.random.default_rng(3), w, b, noise=0.0)
    d = box_deltas(torch.from_numpy(props[:40]).double(), torch.from_numpy(gt[:1]).double())
    expected = feats[:40].astype(np.float64) @ w[0].T + b[0]
    assert np.allclose(d.numpy(), expected, atol=1e-4)


def test_regression_moves_proposals_onto_ground_truth(fitted):
    reg, test = fitted
    assert reg.coef_.shape == (K, 4, D) and reg.intercept_.shape == (K, 4)
    assert reg.samples_.shape == (K,) and (reg.samples_ > 100).all()
    before, after = [], []
    for feats, props, gt, labels in test:
        boxes = reg.predict(feats, props)
        assert boxes.shape == (len(props), K, 4) and boxes.dtype == torch.float32
        p = torch.from_numpy(props)
        best_iou, best = pixel_iou(p, torch.from_numpy(gt)).max(1)
        cls = torch.from_numpy(labels)[best] - 1
        own = boxes[torch.arange(len(p)), cls]        # each proposal's box of its object's class
        before.append(best_iou)
        after.append(pixel_iou(own, torch.from_numpy(gt)).max(1).values)
    before, after = torch.cat(before).mean().item(), torch.cat(after).mean().item()
    assert before < 0.8 and after > 0.93 and after > before + 0.15


def test_scale_gives_target_norm(fitted):
    reg, _ = fitted
    # Features are N(0, I_16) rows: mean norm about 4, so the factor is about 20 / 4.
    assert reg.scale_ == pytest.approx(20.0 / 3.94, rel=0.05)


def test_samples_below_min_iou_are_ignored():
    rng = np.random.default_rng(5)
    gt = np.array([[10.0, 10.0, 109.0, 109.0]], np.float32)
    shifts = rng.uniform(0, 60, size=200)           # IoU spans ~0.25 .. 1
    props = np.stack([10 + shifts, np.full(200, 10.0), 109 + shifts, np.full(200, 109.0)],
                     1).astype(np.float32)
    iou = pixel_iou(torch.from_numpy(props), torch.from_numpy(gt))[:, 0].numpy()
    feats = rng.normal(size=(200, D)).astype(np.float32)
    reg = BoxRegressor(num_classes=K, min_iou=0.6)
    assert reg.add(feats, props, gt, [2]) == int((iou >= 0.6).sum()) > 10
    assert reg.n_seen_.tolist() == [0, int((iou >= 0.6).sum()), 0]
    # Only the qualifying rows are stored, with the exact targets.
    x, y = reg._reservoirs[1].arrays(D)
    sel = iou >= 0.6
    assert np.array_equal(x, feats[sel])
    expected = box_deltas(torch.from_numpy(props[sel]).double(), torch.from_numpy(gt).double())
    assert np.allclose(y, expected.numpy())
    # Nothing qualifies at a stricter threshold; no ground truth, no samples.
    strict = BoxRegressor(num_classes=K, min_iou=1.01)
    assert strict.add(feats, props, gt, [2]) == 0 and strict.n_seen_.sum() == 0
    assert reg.add(feats, props, np.zeros((0, 4), np.float32), []) == 0


def test_class_without_samples_predicts_the_proposal():
    w, b = _true_model()
    rng = np.random.default_rng(7)
    reg = BoxRegressor(num_classes=K)
    for _ in range(3):
        reg.add(*_image(rng, w, b, classes=(1, 3)))
    reg.add(*_image(rng, w, b, classes=(2,), per_box=5))    # too few samples: identity
    reg.fit()
    assert reg.samples_[0] > 0 and reg.samples_[1] == 0 and reg.samples_[2] > 0
    assert not reg.coef_[1].any() and not reg.intercept_[1].any()
    feats, props, _, _ = _image(rng, w, b)
    boxes = reg.predict(feats, props)
    assert torch.allclose(boxes[:, 1], torch.from_numpy(props), atol=1e-3)
    assert not torch.allclose(boxes[:, 0], torch.from_numpy(props), atol=1e-1)


def test_state_round_trip_and_torch_inputs(fitted):
    reg, test = fitted
    buffer = io.BytesIO()
    torch.save(reg.to_state(), buffer)
    buffer.seek(0)
    again = BoxRegressor.from_state(torch.load(buffer, weights_only=True))
    assert again.get_config() == reg.get_config() and again.scale_ == reg.scale_
    assert np.array_equal(again.samples_, reg.samples_)
    feats, props, _, _ = test[0]
    expected = reg.predict(feats, props)
    assert torch.equal(again.predict(feats, props), expected)
    assert torch.equal(again.predict(torch.from_numpy(feats), torch.from_numpy(props)), expected)
    assert again.predict(np.zeros((0, D), np.float32), np.zeros((0, 4))).shape == (0, K, 4)


def test_predict_matches_per_class_reference(fitted):
    reg, test = fitted
    feats, props, _, _ = test[1]
    p = torch.from_numpy(props)
    for k in range(K):
        d = feats.astype(np.float64) * reg.scale_ @ reg.coef_[k].T.astype(np.float64) \
            + reg.intercept_[k]
        ref = apply_deltas(p, torch.from_numpy(d).float())
        assert torch.allclose(reg.predict(feats, props)[:, k], ref, atol=1e-3)


def test_cap_holds_and_keeps_a_uniform_subset():
    w, b = _true_model()
    rng = np.random.default_rng(11)
    reg = BoxRegressor(num_classes=K, max_samples_per_class=50)
    for _ in range(8):
        reg.add(*_image(rng, w, b, per_box=20))
    seen = reg.n_seen_
    assert (seen > 100).all() and (seen <= 160).all()    # proposals with IoU >= 0.6 of 160
    reg.fit()
    assert reg.samples_.tolist() == [50, 50, 50]
    # Reservoir sampling: every stream position is kept with probability capacity / n.
    counts = np.zeros(100)
    for seed in range(2000):
        res = _Reservoir(10, np.random.default_rng(seed))
        for start in range(0, 100, 7):
            idx = np.arange(start, min(start + 7, 100))
            res.add(idx[:, None].astype(np.float32), np.zeros((len(idx), 4)))
        x, _ = res.arrays(1)
        assert len(x) == 10 and len(np.unique(x)) == 10
        counts[x[:, 0].astype(int)] += 1
    assert np.abs(counts / 2000 - 0.1).max() < 0.04


def test_same_seed_same_subset_and_bad_inputs():
    w, b = _true_model()
    regs = []
    for _ in range(2):
        rng = np.random.default_rng(2)
        reg = BoxRegressor(num_classes=K, max_samples_per_class=30, random_state=4)
        for _ in range(4):
            reg.add(*_image(rng, w, b, per_box=20))
        regs.append(reg.fit())
    assert np.array_equal(regs[0].coef_, regs[1].coef_)
    feats, props, gt, labels = _image(np.random.default_rng(0), w, b)
    with pytest.raises(ValueError, match="1..3"):
        BoxRegressor(num_classes=K).add(feats, props, gt, [0, 1, 2])
    with pytest.raises(ValueError, match="proposals"):
        BoxRegressor(num_classes=K).add(feats[:-1], props, gt, labels)
    with pytest.raises(ValueError, match="columns"):
        regs[0].add(feats[:, :-1], props, gt, labels)
