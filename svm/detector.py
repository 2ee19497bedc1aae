"""`LinearSVMDetector`: the K per-class SVMs of a detector as one scikit-learn-style estimator.
`fit` runs the hard negative mining pass (`svm.mining`), `decision_function` scores features of
any boxes for every class, `to_state` / `from_state` save and load it without pickling.

Class c (1..K, 0 being background as in the detector outputs) is column c - 1 of the scores.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from svm.linear import (BIAS_FEATURE, LIBLINEAR_TOL, POSITIVE_WEIGHT, SVM_C, TARGET_NORM,
                        ClassSVM, FeatureScaler, as_float32, as_numpy, linear_scores)
from svm.mining import (EVICT_THRESHOLD, HARD_THRESHOLD, MAX_CACHE, NEGATIVE_IOU, RETRAIN_LIMIT,
                        ClassReport, ImageBatch, MiningSettings, RetrainEvent,
                        mine_hard_negatives)

STATE_FORMAT = "sppnet.svm.LinearSVMDetector/1"
STATE_ARRAYS = ("coef", "intercept", "scale", "trained")


class LinearSVMDetector(BaseEstimator):
    """One linear SVM per class over scaled fc7 features, trained with hard negative mining.

    The defaults are the R-CNN / SPP-net protocol: C = 0.001, positive weight 2, bias feature 10
    (regularised), mean feature norm 20, hard above -1.0001, evict below -1.2, retrain after 2000
    new hard negatives, negatives below IoU 0.3. `max_cache` bounds each class's cache (see
    `svm.mining`); `tol` is liblinear's default for its dual solver, as R-CNN ran it.

    Learned (after `fit` or `from_state`): `coef_` `[K, D]` float32 (scaled feature space),
    `intercept_` `[K]` float32, `scale_` (the feature factor), `trained_` `[K]` bool (a class that
    had no positive or no negative keeps zero weights and `UNTRAINED_INTERCEPT`, so it scores
    -1000 everywhere), `n_features_in_`, `n_classes_`. After `fit` only: `reports_` (per class:
    positives, retrains, cache size, final objective), `retrains_` (every retrain in order: images
    seen, rows, objective, evictions, cache size), `cache_keys_` (per class, the final cache's
    (image index, row index) pairs), `n_images_seen_`.
    """

    def __init__(self, C: float = SVM_C, positive_weight: float = POSITIVE_WEIGHT,
                 intercept_scaling: float = BIAS_FEATURE, target_norm: float = TARGET_NORM,
                 hard_threshold: float = HARD_THRESHOLD, evict_threshold: float = EVICT_THRESHOLD,
                 retrain_limit: int = RETRAIN_LIMIT, negative_iou: float = NEGATIVE_IOU,
                 max_cache: int = MAX_CACHE, tol: float = LIBLINEAR_TOL, max_iter: int = 1000,
                 random_state: int | None = 0) -> None:
        self.C = C
        self.positive_weight = positive_weight
        self.intercept_scaling = intercept_scaling
        self.target_norm = target_norm
        self.hard_threshold = hard_threshold
        self.evict_threshold = evict_threshold
        self.retrain_limit = retrain_limit
        self.negative_iou = negative_iou
        self.max_cache = max_cache
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state

    def class_svm(self) -> ClassSVM:
        """The per-class trainer with this detector's SVM settings."""
        return ClassSVM(C=self.C, positive_weight=self.positive_weight,
                        intercept_scaling=self.intercept_scaling, tol=self.tol,
                        max_iter=self.max_iter, random_state=self.random_state)

    def mining_settings(self) -> MiningSettings:
        """The mining schedule of this detector."""
        return MiningSettings(hard_threshold=self.hard_threshold,
                              evict_threshold=self.evict_threshold,
                              retrain_limit=self.retrain_limit, negative_iou=self.negative_iou,
                              max_cache=self.max_cache)

    def fit(self, images: Iterable[ImageBatch | Sequence[Any]],
            positives: tuple[Any, Any] | None = None,
            scaler: FeatureScaler | None = None) -> "LinearSVMDetector":
        """Mine and train in one pass over `images`, an iterable (a generator is fine: it is
        consumed once) of per-image `ImageBatch(features [N, D], gt_class [N], max_iou [N, K])`
        or such tuples. `positives` = `(features [P, D], labels [P])` gives all ground-truth
        rows up front (R-CNN's order) instead of taking them from the stream; `scaler`, a fitted
        `FeatureScaler`, fixes the feature factor instead of the stream's running estimate."""
        result = mine_hard_negatives(images, svm=self.class_svm(),
                                     settings=self.mining_settings(), scaler=scaler,
                                     positives=positives, target_norm=self.target_norm)
        self._set_model(result.coef, result.intercept, result.scale, result.trained)
        self.reports_: list[ClassReport] = result.reports
        self.retrains_: list[RetrainEvent] = result.events
        self.cache_keys_: list[np.ndarray] = result.cache_keys
        self.n_images_seen_ = result.n_images
        return self

    def _set_model(self, coef: np.ndarray, intercept: np.ndarray, scale: float,
                   trained: np.ndarray) -> None:
        self.coef_ = np.ascontiguousarray(coef, dtype=np.float32)
        self.intercept_ = np.ascontiguousarray(intercept, dtype=np.float32).reshape(-1)
        self.scale_ = float(scale)
        self.trained_ = np.asarray(trained, dtype=bool).reshape(-1)
        self.n_classes_, self.n_features_in_ = self.coef_.shape
        if self.intercept_.shape != (self.n_classes_,) or self.trained_.shape != (self.n_classes_,):
            raise ValueError(f"coef {self.coef_.shape}, intercept {self.intercept_.shape} and "
                             f"trained {self.trained_.shape} do not describe the same classes")

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("LinearSVMDetector is not fitted: call fit or from_state")

    def decision_function(self, features: Any) -> np.ndarray:
        """Scores `[N, K]` float32 of raw (unscaled) features `[N, D]` (numpy or torch): the
        scale factor of training is applied here."""
        self._check_fitted()
        x = as_float32(features, 2)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} features, got {x.shape[1]}")
        return linear_scores(x, self.coef_, self.intercept_, self.scale_)

    def summary(self) -> dict[str, Any]:
        """A JSON-able record of the training pass (for `--json`)."""
        self._check_fitted()
        return {"scale": self.scale_, "n_images": getattr(self, "n_images_seen_", None),
                "classes": [r.as_dict() for r in getattr(self, "reports_", [])],
                "retrains": [e.as_dict() for e in getattr(self, "retrains_", [])]}

    def to_state(self) -> dict[str, Any]:
        """The fitted model as numpy arrays (`coef`, `intercept`, `scale`, `trained`) and a
        JSON-able `config` dict (format, hyper-parameters, sizes). For `torch.save(...)` loaded
        with `weights_only=True`, convert the arrays to tensors (`from_state` takes either) and
        keep `config` as is or as `json.dumps(config)`; `np.savez` takes the arrays plus the
        config as a JSON string."""
        self._check_fitted()
        return {"coef": self.coef_.copy(), "intercept": self.intercept_.copy(),
                "scale": np.asarray(self.scale_, dtype=np.float64),
                "trained": self.trained_.copy(),
                "config": {"format": STATE_FORMAT, "params": self.get_params(),
                           "n_classes": int(self.n_classes_),
                           "n_features": int(self.n_features_in_)}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "LinearSVMDetector":
        """A fitted detector from `to_state()`'s output (arrays as numpy or torch; `config` as a
        dict, a JSON string, or a 0-d string array as `np.load` gives it back)."""
        missing = [k for k in (*STATE_ARRAYS, "config") if k not in state]
        if missing:
            raise ValueError(f"not a LinearSVMDetector state: missing {', '.join(missing)}")
        config = state["config"]
        if isinstance(config, np.ndarray):
            config = config.item()
        if isinstance(config, (str, bytes)):
            config = json.loads(config)
        if config.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown state format {config.get('format')!r}, expected "
                             f"{STATE_FORMAT!r}")
        detector = cls(**config["params"])
        detector._set_model(as_numpy(state["coef"], np.float32),
                            as_numpy(state["intercept"], np.float32),
                            float(as_numpy(state["scale"], np.float64)),
                            as_numpy(state["trained"], bool))
        if (detector.n_classes_, detector.n_features_in_) != (config["n_classes"],
                                                              config["n_features"]):
            raise ValueError("the state's arrays do not match its config's sizes")
        return detector
