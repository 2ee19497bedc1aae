"""The linear pieces of the SVM stage: input conversion, the feature scaler, the design matrix, one
class-versus-background SVM (scikit-learn's liblinear `LinearSVC` with R-CNN's hyper-parameters),
its objective and the scoring of many classes at once.

Protocol (R-CNN's `rcnn_train.m`, reused by SPP-net): features are multiplied by one scalar so that
their mean L2 norm on the training boxes is 20; each class is an L2-regularised L1-loss (hinge) SVM
solved in the dual (liblinear `-s 3`), C = 0.001, positives weighted 2, and a constant bias feature
of 10 whose weight is regularised like the others (so the intercept costs 0.5 (b / 10)^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.svm import LinearSVC

TARGET_NORM = 20.0
SVM_C = 1e-3
POSITIVE_WEIGHT = 2.0
BIAS_FEATURE = 10.0
# liblinear's own default tolerance for its dual solvers, the one R-CNN ran with (its option
# string sets no -e); scikit-learn's LinearSVC default (1e-4) is far stricter and slower.
LIBLINEAR_TOL = 0.1
POSITIVE, NEGATIVE = 1, -1


def as_float32(array: Any, ndim: int | None = None, name: str = "features") -> np.ndarray:
    """A numpy float32 C-contiguous view (or copy) of a numpy array or a torch tensor (moved to the
    CPU); no torch import needed. `ndim`, when given, is checked."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    out = np.ascontiguousarray(array, dtype=np.float32)
    if ndim is not None and out.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {out.shape}")
    return out


def as_numpy(array: Any, dtype: Any) -> np.ndarray:
    """A numpy array of `dtype` from a numpy array, a torch tensor or a sequence."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=dtype)


class FeatureScaler(BaseEstimator):
    """Multiply features by one scalar so that their mean L2 norm is `target_norm` (R-CNN's
    `rcnn_scale_features`). Fit it on training boxes, apply the same factor at test time.

    `partial_fit` accumulates the sum of row norms batch by batch, so the factor of a whole split
    can be computed while streaming it; `fit` restarts from a sample.
    """

    def __init__(self, target_norm: float = TARGET_NORM) -> None:
        self.target_norm = target_norm

    def partial_fit(self, features: Any) -> "FeatureScaler":
        """Add the rows of `features` `[N, D]` to the running mean norm."""
        x = as_float32(features, 2)
        if not hasattr(self, "n_samples_seen_"):
            self.n_samples_seen_ = 0
            self.norm_sum_ = 0.0
        self.norm_sum_ += float(np.linalg.norm(x, axis=1).sum(dtype=np.float64))
        self.n_samples_seen_ += len(x)
        return self

    def fit(self, features: Any) -> "FeatureScaler":
        """Compute the factor from the rows of `features` `[N, D]` alone."""
        for attribute in ("n_samples_seen_", "norm_sum_"):
            self.__dict__.pop(attribute, None)
        return self.partial_fit(features)

    @property
    def mean_norm_(self) -> float:
        """The mean L2 norm of the rows seen so far."""
        if not getattr(self, "n_samples_seen_", 0):
            raise NotFittedError("FeatureScaler has seen no rows; call fit or partial_fit first")
        return self.norm_sum_ / self.n_samples_seen_

    @property
    def scale_(self) -> float:
        """The factor: `target_norm / mean_norm_`, or 1 when every row seen is zero."""
        mean = self.mean_norm_
        return float(self.target_norm / mean) if mean > 0 else 1.0

    def transform(self, features: Any) -> np.ndarray:
        """`features * scale_` as float32."""
        return as_float32(features, 2) * np.float32(self.scale_)


def design_matrix(positives: np.ndarray, negatives: np.ndarray,
                  scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The scaled training rows `[P + M, D]` as float64 (what liblinear takes, built once so that
    `LinearSVC` does not copy it again) and labels `[P + M]` (+1 then -1).

    Memory: `(P + M) * D * 8` bytes here, plus liblinear's own sparse copy inside `fit` (16 bytes
    per nonzero value and 32 per row) while it trains.
    """
    n_pos = len(positives)
    x = np.empty((n_pos + len(negatives), positives.shape[1]), dtype=np.float64)
    np.multiply(positives, scale, out=x[:n_pos], casting="unsafe")
    np.multiply(negatives, scale, out=x[n_pos:], casting="unsafe")
    y = np.full(len(x), NEGATIVE, dtype=np.int64)
    y[:n_pos] = POSITIVE
    return x, y


class ClassSVM(BaseEstimator):
    """One class versus background: a `LinearSVC` set up as R-CNN's liblinear call
    (`-s 3 -c C -w1 positive_weight -B intercept_scaling`).

    Labels are +1 (the class) and -1 (background). After `fit`: `coef_` `[D]` (float64),
    `intercept_` (float, = intercept_scaling times the weight of the bias feature), `n_iter_`,
    `svc_` (the fitted `LinearSVC`).
    """

    def __init__(self, C: float = SVM_C, positive_weight: float = POSITIVE_WEIGHT,
                 intercept_scaling: float = BIAS_FEATURE, tol: float = LIBLINEAR_TOL,
                 max_iter: int = 1000, random_state: int | None = 0) -> None:
        self.C = C
        self.positive_weight = positive_weight
        self.intercept_scaling = intercept_scaling
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state

    def make_svc(self) -> LinearSVC:
        """The unfitted `LinearSVC` with the protocol's settings."""
        return LinearSVC(C=self.C, loss="hinge", penalty="l2", dual=True,
                         class_weight={POSITIVE: self.positive_weight, NEGATIVE: 1.0},
                         fit_intercept=True, intercept_scaling=self.intercept_scaling,
                         tol=self.tol, max_iter=self.max_iter, random_state=self.random_state)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "ClassSVM":
        """Train on rows `x` `[N, D]` (pass float64 C-contiguous to avoid a copy) and labels `y`
        `[N]` in {+1, -1}; both labels must be present."""
        labels = np.unique(y)
        if not (np.array_equal(labels, [NEGATIVE, POSITIVE])):
            raise ValueError(f"ClassSVM needs labels +1 and -1 both present, got {labels.tolist()}")
        self.svc_ = self.make_svc().fit(x, y)
        self.coef_ = self.svc_.coef_[0].copy()
        self.intercept_ = float(self.svc_.intercept_[0])
        self.n_iter_ = int(np.max(self.svc_.n_iter_))
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Scores `x @ coef_ + intercept_` `[N]`."""
        if not hasattr(self, "coef_"):
            raise NotFittedError("ClassSVM is not fitted yet")
        return x @ self.coef_ + self.intercept_


@dataclass(frozen=True)
class Objective:
    """The primal objective of one class's SVM on its training rows, split as R-CNN logs it."""

    positive_loss: float   # C * positive_weight * sum(hinge) over positives
    negative_loss: float   # C * sum(hinge) over negatives
    regulariser: float     # 0.5 |w|^2 + 0.5 (b / intercept_scaling)^2

    @property
    def total(self) -> float:
        return self.positive_loss + self.negative_loss + self.regulariser

    @property
    def hinge_loss(self) -> float:
        """The weighted training hinge loss (positive + negative parts, C included)."""
        return self.positive_loss + self.negative_loss


def svm_objective(positive_scores: np.ndarray, negative_scores: np.ndarray, coef: np.ndarray,
                  intercept: float, C: float = SVM_C, positive_weight: float = POSITIVE_WEIGHT,
                  intercept_scaling: float = BIAS_FEATURE) -> Objective:
    """The objective liblinear minimises, from the training scores (as `rcnn_train.m` logs it)."""
    return Objective(
        positive_loss=float(C * positive_weight * np.maximum(0.0, 1.0 - positive_scores).sum()),
        negative_loss=float(C * np.maximum(0.0, 1.0 + negative_scores).sum()),
        regulariser=float(0.5 * np.dot(coef, coef) + 0.5 * (intercept / intercept_scaling) ** 2))


def linear_scores(features: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                  scale: float) -> np.ndarray:
    """Scores `[N, K]` of all classes for raw features `[N, D]`: `(scale * features) @ coef.T +
    intercept` with `coef` `[K, D]` in the scaled space. The scale is folded into the `[K, D]`
    weights, so the features are neither copied nor multiplied."""
    weights = (coef * np.float32(scale)).astype(features.dtype, copy=False)
    return features @ weights.T + intercept.astype(features.dtype, copy=False)
