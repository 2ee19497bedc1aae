"""Feature scaling, the one-class SVM (against a slow dual solver written here), its objective and
multi-class scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.exceptions import NotFittedError

from svm.linear import ClassSVM, FeatureScaler, design_matrix, linear_scores, svm_objective


def test_scaler_makes_the_mean_norm_20_and_applies_the_same_factor_at_test():
    rng = np.random.default_rng(0)
    train = rng.gamma(2.0, size=(500, 64)).astype(np.float32)
    scaler = FeatureScaler().fit(train)
    assert np.linalg.norm(scaler.transform(train), axis=1).mean() == pytest.approx(20.0, rel=1e-5)
    test = rng.gamma(2.0, size=(7, 64)).astype(np.float32) * 3
    assert np.allclose(scaler.transform(test), test * scaler.scale_, rtol=1e-6)
    assert scaler.transform(test).dtype == np.float32
    assert np.array_equal(scaler.transform(torch.from_numpy(test)), scaler.transform(test))


def test_scaler_partial_fit_over_batches_equals_fit_on_all_rows():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(300, 16)).astype(np.float32)
    streamed = FeatureScaler()
    for part in np.array_split(rows, 7):
        streamed.partial_fit(part)
    whole = FeatureScaler().fit(rows)
    assert streamed.n_samples_seen_ == 300
    assert streamed.scale_ == pytest.approx(whole.scale_, rel=1e-9)
    # fit restarts from the sample it is given
    assert streamed.fit(rows[:10]).n_samples_seen_ == 10


def test_scaler_unfitted_raises_and_zero_rows_keep_factor_one():
    with pytest.raises(NotFittedError):
        FeatureScaler().transform(np.ones((2, 3)))
    assert FeatureScaler().fit(np.zeros((4, 3))).scale_ == 1.0


def test_class_svm_defaults_are_the_protocol():
    svc = ClassSVM().make_svc()
    params = svc.get_params()
    assert params["C"] == 0.001
    assert params["class_weight"] == {1: 2.0, -1: 1.0}
    assert params["intercept_scaling"] == 10.0 and params["fit_intercept"]
    assert params["loss"] == "hinge" and params["dual"] is True and params["penalty"] == "l2"
    assert params["tol"] == 0.1  # liblinear's default for -s 3, as R-CNN ran it


def test_design_matrix_is_scaled_float64_with_positives_first():
    pos = np.ones((2, 3), dtype=np.float32)
    neg = np.full((4, 3), 2.0, dtype=np.float32)
    x, y = design_matrix(pos, neg, 0.5)
    assert x.dtype == np.float64 and x.flags.c_contiguous
    assert np.array_equal(x, np.vstack([pos * 0.5, neg * 0.5]))
    assert y.tolist() == [1, 1, -1, -1, -1, -1]


def reference_svm(x, y, C, positive_weight, bias):
    """The L2-regularised L1-loss SVM with a regularised bias feature, solved in the dual by
    L-BFGS-B: max sum(a) - 0.5 |sum a_i y_i [x_i, bias]|^2, 0 <= a_i <= C * weight_i."""
    q = y[:, None] * np.hstack([x, np.full((len(x), 1), bias)])
    upper = C * np.where(y > 0, positive_weight, 1.0)

    def negative_dual(a):
        v = q.T @ a
        return 0.5 * v @ v - a.sum(), q @ v - 1.0

    a = minimize(negative_dual, np.zeros(len(x)), jac=True, method="L-BFGS-B",
                 bounds=list(zip(np.zeros(len(x)), upper)),
                 options={"ftol": 1e-16, "gtol": 1e-14, "maxiter": 20000}).x
    w = q.T @ a
    return w[:-1], w[-1] * bias


@pytest.mark.parametrize("C", [0.001, 1.0])
def test_class_svm_matches_a_reference_dual_solver(C):
    """Positive weight 2 and a bias feature of 10 whose weight is regularised (liblinear -B)."""
    rng = np.random.default_rng(2)
    x = np.vstack([rng.normal(1.0, 1.0, size=(15, 5)), rng.normal(-0.5, 1.0, size=(45, 5))])
    x *= 20.0 / np.linalg.norm(x, axis=1).mean()
    y = np.r_[np.ones(15), -np.ones(45)].astype(np.int64)
    ours = ClassSVM(C=C, tol=1e-8, max_iter=100000).fit(x, y)
    w, b = reference_svm(x, y, C, 2.0, 10.0)
    assert np.allclose(ours.coef_, w, rtol=1e-4, atol=1e-6 * np.abs(w).max())
    assert ours.intercept_ == pytest.approx(b, rel=1e-4, abs=1e-6)

    def objective(coef, intercept):
        scores = x @ coef + intercept
        return svm_objective(scores[y > 0], scores[y < 0], coef, intercept, C=C).total

    assert objective(ours.coef_, ours.intercept_) == pytest.approx(objective(w, b), rel=1e-6)


def test_class_svm_needs_both_labels():
    with pytest.raises(ValueError, match="both"):
        ClassSVM().fit(np.ones((3, 2)), np.ones(3, dtype=int))


def test_objective_is_r_cnn_formula():
    obj = svm_objective(np.array([0.5, 2.0]), np.array([-0.5, -3.0]), np.array([3.0, 4.0]), 20.0)
    assert obj.positive_loss == pytest.approx(0.001 * 2 * 0.5)
    assert obj.negative_loss == pytest.approx(0.001 * 0.5)
    assert obj.regulariser == pytest.approx(0.5 * 25 + 0.5 * 4)
    assert obj.total == pytest.approx(obj.hinge_loss + obj.regulariser)


def test_linear_scores_apply_the_scale_to_the_features():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(9, 6)).astype(np.float32)
    coef = rng.normal(size=(4, 6)).astype(np.float32)
    intercept = rng.normal(size=4).astype(np.float32)
    scores = linear_scores(features, coef, intercept, 0.25)
    assert scores.shape == (9, 4) and scores.dtype == np.float32
    assert np.allclose(scores, (features * 0.25) @ coef.T + intercept, atol=1e-5)
