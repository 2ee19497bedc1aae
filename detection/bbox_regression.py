"""Per-class bounding-box regression, as R-CNN's `rcnn_train_bbox_regressor` (reused by SPP-net).

For each class, a ridge regression maps the features of a proposal to the deltas
`(dx, dy, log dw, log dh)` (`detection.boxes.box_deltas`) that move it onto the ground-truth box it
overlaps. Training samples are the proposals whose best IoU with a ground-truth box is at least
`min_iou` (R-CNN: 0.6 on pool5 with lambda = 1000; SPP-net: 0.5 on pooled conv5 with
lambda = 4000); each becomes a sample of that box's class. Features are multiplied by one scalar so
that their mean L2 norm over the samples is `target_norm` (20, as the SVM features), and the same
factor is applied at test time.

Usage (scikit-learn-like: hyper-parameters in `__init__`, `fit` returns self, learned state in
attributes ending in `_`):

    reg = BoxRegressor(num_classes=20)
    for image in train_images:
        reg.add(features, proposals, gt_boxes, gt_labels)
    reg.fit()
    boxes = reg.predict(test_features, test_proposals)    # [N, K, 4]; class k is boxes[:, k - 1]
    torch.save(reg.to_state(), path)
    reg = BoxRegressor.from_state(torch.load(path, weights_only=True))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge
from torch import Tensor

from detection.boxes import apply_deltas, box_deltas, pixel_iou

MIN_SAMPLES = 10
MAX_SAMPLES_PER_CLASS = 5000


def _float32(array: Any, ndim: int, name: str) -> np.ndarray:
    """A float32 numpy array of `ndim` dimensions from a numpy array or a torch tensor."""
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    out = np.ascontiguousarray(array, dtype=np.float32)
    if out.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {out.shape}")
    return out


def _boxes(array: Any, name: str) -> Tensor:
    """Boxes `[N, 4]` as a float32 CPU tensor (an empty input may have any shape with 0 rows)."""
    if isinstance(array, Tensor):
        boxes = array.detach().cpu().float()
    else:
        boxes = torch.from_numpy(np.array(array, dtype=np.float32))
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {tuple(boxes.shape)}")
    return boxes


class _Reservoir:
    """A uniform random subset of at most `capacity` rows of a stream (reservoir sampling,
    Vitter's algorithm R, vectorised per batch). Rows are `(features float32, targets float64)`."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.seen = 0
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._x: np.ndarray | None = None   # consolidated, once full
        self._y: np.ndarray | None = None

    def _consolidate(self) -> None:
        if self._chunks:
            xs = ([] if self._x is None else [self._x]) + [c[0] for c in self._chunks]
            ys = ([] if self._y is None else [self._y]) + [c[1] for c in self._chunks]
            self._x, self._y = np.concatenate(xs), np.concatenate(ys)
            self._chunks = []

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        n = len(x)
        fill = max(0, min(n, self.capacity - self.seen))
        if fill:
            self._chunks.append((x[:fill].copy(), y[:fill].copy()))
        if fill < n:
            # Row t (0-based stream index) replaces a uniform slot j in [0, t] when j < capacity.
            t = self.seen + np.arange(fill, n)
            j = self.rng.integers(0, t + 1)
            hit = np.nonzero(j < self.capacity)[0]
            if len(hit):
                self._consolidate()
                # Later rows win a slot drawn twice in one batch, as in the sequential algorithm.
                slots, last = np.unique(j[hit][::-1], return_index=True)
                rows = fill + hit[::-1][last]
                self._x[slots] = x[rows]
                self._y[slots] = y[rows]
        self.seen += n

    def arrays(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        self._consolidate()
        if self._x is None:
            return np.zeros((0, dim), np.float32), np.zeros((0, 4), np.float64)
        return self._x, self._y


class BoxRegressor:
    """Per-class ridge regression of box deltas from region features (R-CNN's bbox regression).

    Parameters: `num_classes` K (labels 1..K, 0 is background), `alpha` the ridge penalty
    (R-CNN 1000, SPP-net 4000), `min_iou` the least best-IoU of a training proposal with a
    ground-truth box (R-CNN 0.6, SPP-net 0.5), `target_norm` the mean feature L2 norm after
    scaling, `max_samples_per_class` the cap on samples kept per class (a uniform random subset,
    seeded by `random_state`), `min_samples` the fewest samples for which a class is fitted (with
    fewer it keeps zero deltas: it predicts the proposal itself).

    Learned attributes after `fit`: `coef_` `[K, 4, D]` and `intercept_` `[K, 4]` (float32, on
    scaled features), `scale_` (the feature factor), `samples_` `[K]` (samples each class was
    fitted on; 0 for a class left at identity), `n_features_in_` D.
    """

    def __init__(self, num_classes: int, alpha: float = 1000.0, min_iou: float = 0.6,
                 target_norm: float = 20.0, max_samples_per_class: int = MAX_SAMPLES_PER_CLASS,
                 min_samples: int = MIN_SAMPLES, random_state: int = 0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if max_samples_per_class < 1:
            raise ValueError(f"max_samples_per_class must be at least 1, got "
                             f"{max_samples_per_class}")
        self.num_classes = num_classes
        self.alpha = alpha
        self.min_iou = min_iou
        self.target_norm = target_norm
        self.max_samples_per_class = max_samples_per_class
        self.min_samples = min_samples
        self.random_state = random_state
        self._reservoirs: list[_Reservoir] | None = None
        self._dim: int | None = None

    # ---------------------------------------------------------------- training samples

    def add(self, features: Any, proposals: Any, gt_boxes: Any, gt_labels: Any) -> int:
        """Accumulate the training samples of one image; return how many proposals qualified.

        `features` `[N, D]` (numpy or torch) are the features of `proposals` `[N, 4]` (0-based
        xyxy); `gt_boxes` `[G, 4]` with `gt_labels` `[G]` in 1..K. A proposal whose best
        `pixel_iou` with a ground-truth box is >= `min_iou` becomes a sample of that box's class
        with target `box_deltas(proposal, box)`. Only those rows are kept (a copy), at most
        `max_samples_per_class` per class over all calls.
        """
        x = _float32(features, 2, "features")
        props = _boxes(proposals, "proposals")
        gts = _boxes(gt_boxes, "gt_boxes")
        labels = np.asarray(gt_labels.detach().cpu() if isinstance(gt_labels, Tensor)
                            else gt_labels, dtype=np.int64).reshape(-1)
        if len(x) != len(props):
            raise ValueError(f"{len(x)} feature rows for {len(props)} proposals")
        if len(labels) != len(gts):
            raise ValueError(f"{len(labels)} labels for {len(gts)} ground-truth boxes")
        if len(labels) and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(f"gt_labels must lie in 1..{self.num_classes}, got "
                             f"{labels.min()}..{labels.max()}")
        if self._dim is None:
            self._dim = x.shape[1]
            rng = np.random.default_rng(self.random_state)
            self._reservoirs = [_Reservoir(self.max_samples_per_class, rng)
                                for _ in range(self.num_classes)]
        elif x.shape[1] != self._dim:
            raise ValueError(f"features have {x.shape[1]} columns, earlier ones had {self._dim}")
        if len(props) == 0 or len(gts) == 0:
            return 0
        best_iou, best = pixel_iou(props, gts).max(dim=1)
        keep = torch.nonzero(best_iou >= self.min_iou).flatten()
        if len(keep) == 0:
            return 0
        targets = box_deltas(props[keep].double(), gts[best[keep]].double()).numpy()
        cls = labels[best[keep].numpy()]
        rows = keep.numpy()
        for c in np.unique(cls):
            sel = cls == c
            self._reservoirs[c - 1].add(x[rows[sel]], targets[sel])
        return len(keep)

    @property
    def n_seen_(self) -> np.ndarray:
        """Qualifying proposals seen per class `[K]` (before the cap)."""
        if self._reservoirs is None:
            return np.zeros(self.num_classes, np.int64)
        return np.array([r.seen for r in self._reservoirs], np.int64)

    # ---------------------------------------------------------------- fit / predict

    def fit(self) -> "BoxRegressor":
        """Fit one `Ridge(alpha)` (with intercept, float64) per class on the samples added so far.

        The feature factor `scale_` makes the mean L2 norm of all kept samples `target_norm`
        (1.0 when there are none). Classes with fewer than `min_samples` samples keep zero deltas.
        """
        if self._reservoirs is None:
            raise NotFittedError("BoxRegressor has no samples: call add() before fit()")
        dim = self._dim
        data = [r.arrays(dim) for r in self._reservoirs]
        n_total = sum(len(x) for x, _ in data)
        norm_sum = sum(float(np.linalg.norm(x, axis=1).sum(dtype=np.float64)) for x, _ in data)
        mean_norm = norm_sum / n_total if n_total else 0.0
        self.scale_ = float(self.target_norm / mean_norm) if mean_norm > 0 else 1.0
        self.coef_ = np.zeros((self.num_classes, 4, dim), np.float32)
        self.intercept_ = np.zeros((self.num_classes, 4), np.float32)
        self.samples_ = np.zeros(self.num_classes, np.int64)
        for k, (x, y) in enumerate(data):
            if len(x) < max(self.min_samples, 1):
                continue
            xs = x.astype(np.float64)       # one float64 copy, scaled in place, centred in place
            xs *= self.scale_
            ridge = Ridge(alpha=self.alpha, fit_intercept=True, copy_X=False)
            ridge.fit(xs, y)
            del xs
            self.coef_[k] = ridge.coef_
            self.intercept_[k] = ridge.intercept_
            self.samples_[k] = len(x)
        self.n_features_in_ = dim
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("BoxRegressor is not fitted yet: call fit() or from_state()")

    def predict_deltas(self, features: Any) -> Tensor:
        """Per-class deltas `[N, K, 4]` (float32) for `features` `[N, D]`, computed on the
        features' device when they are a torch tensor."""
        self._check_fitted()
        x = features if isinstance(features, Tensor) else torch.from_numpy(
            _float32(features, 2, "features"))
        x = x.detach().float()
        if x.dim() != 2 or x.shape[1] != self.n_features_in_:
            raise ValueError(f"features must have shape [N, {self.n_features_in_}], "
                             f"got {tuple(x.shape)}")
        coef = torch.from_numpy(self.coef_).to(x.device)
        intercept = torch.from_numpy(self.intercept_).to(x.device)
        return torch.einsum("nd,kjd->nkj", x * self.scale_, coef) + intercept

    def predict(self, features: Any, proposals: Any) -> Tensor:
        """Regressed boxes `[N, K, 4]` (float32, 0-based xyxy) for `proposals` `[N, 4]` with
        `features` `[N, D]`; the box of class k (1-based) is `[:, k - 1]`. On the proposals'
        device (CPU for numpy)."""
        if isinstance(proposals, Tensor):
            props = proposals.detach().float()
            props = props.reshape(0, 4) if props.numel() == 0 else props
        else:
            props = _boxes(proposals, "proposals")
        if props.dim() != 2 or props.shape[1] != 4:
            raise ValueError(f"proposals must have shape [N, 4], got {tuple(props.shape)}")
        deltas = self.predict_deltas(features)
        if len(deltas) != len(props):
            raise ValueError(f"{len(deltas)} feature rows for {len(props)} proposals")
        return apply_deltas(props, deltas.to(props.device))

    # ---------------------------------------------------------------- checkpoint

    def get_config(self) -> dict:
        """The hyper-parameters as a JSON-able dict."""
        return {"num_classes": self.num_classes, "alpha": float(self.alpha),
                "min_iou": float(self.min_iou), "target_norm": float(self.target_norm),
                "max_samples_per_class": int(self.max_samples_per_class),
                "min_samples": int(self.min_samples), "random_state": self.random_state}

    def to_state(self) -> dict:
        """Tensors and a JSON-able `config` for `torch.save` / `torch.load(weights_only=True)`."""
        self._check_fitted()
        return {"coef": torch.from_numpy(self.coef_.copy()),
                "intercept": torch.from_numpy(self.intercept_.copy()),
                "samples": torch.from_numpy(self.samples_.copy()),
                "config": {**self.get_config(), "scale": self.scale_}}

    @classmethod
    def from_state(cls, state: dict) -> "BoxRegressor":
        """A fitted regressor from `to_state()`'s dict (no training samples)."""
        config = dict(state["config"])
        scale = float(config.pop("scale"))
        reg = cls(**config)
        reg.coef_ = state["coef"].detach().cpu().to(torch.float32).numpy().copy()
        reg.intercept_ = state["intercept"].detach().cpu().to(torch.float32).numpy().copy()
        reg.samples_ = state["samples"].detach().cpu().to(torch.int64).numpy().copy()
        if reg.coef_.shape[:2] != (reg.num_classes, 4) or \
                reg.intercept_.shape != (reg.num_classes, 4):
            raise ValueError(f"state for {reg.num_classes} classes has coef "
                             f"{tuple(reg.coef_.shape)} and intercept "
                             f"{tuple(reg.intercept_.shape)}")
        reg.scale_ = scale
        reg.n_features_in_ = int(reg.coef_.shape[2])
        return reg

    def __repr__(self) -> str:
        return (f"BoxRegressor(num_classes={self.num_classes}, alpha={self.alpha}, "
                f"min_iou={self.min_iou}, target_norm={self.target_norm})")
