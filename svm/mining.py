"""Hard negative mining in one pass over the training images, as R-CNN's `rcnn_train.m` (which
SPP-net reused), with features streamed one image at a time.

For each image, in stream order:

1. the feature scaler sees the image's rows (unless a fitted scaler was given) and its
   ground-truth rows join their class's positives (unless the positives were given up front);
2. one matrix product scores all rows for all classes with the current models (a class that was
   never trained has the zero model: every negative scores 0 > -1.0001 and is hard);
3. for each class, the hard negatives (IoU < 0.3 with every box of the class, score > -1.0001)
   that the class's cache does not hold yet, keyed by (image index, row index), join the cache;
4. a class is retrained on its positives + cached negatives the first time it can be (it has
   both; R-CNN's `first_time`) and then whenever it has gained >= `retrain_limit` (2000) new
   negatives since its last retrain (R-CNN tests `> 2000`, one negative apart); after each retrain
   the negatives scoring < -1.2 are evicted.

After the pass every class is retrained once more (skipped when nothing changed since its last
retrain: same rows, same scale, so the same model) and evicted again, as R-CNN does at its last
image.

Positives: ground-truth rows only (`gt_class == c`). A ground-truth row of another class is a
negative of class c when its IoU with every box of c is below 0.3, as in R-CNN. By default the
positives are gathered from the stream, so a retrain uses the positives seen so far and the final
one uses all of them; R-CNN collected them all first, which `positives=` reproduces.

Memory, for D-dimensional features and K classes (float32 = 4 bytes):
- the stream: one image's rows at a time (the caller's iterator yields them; of a finished
  image only copies of its positives and hard negatives stay);
- the first image, under the zero models: every class caches all its negatives, K * N * D * 4
  bytes (655 MB for 20 classes, 2000 boxes, D = 4096) until the first retrains evict most;
- the caches: at most `max_cache` hard negatives per class, K * max_cache * D * 4 bytes in the
  worst case (default 20,000: 328 MB per class at D = 4096); when a cache would exceed it, the
  highest-scoring negatives under the current model are kept (ties: the earlier cached). A class
  that cannot be trained yet (no positive seen) keeps at most `retrain_limit` negatives, since
  under its zero model they all tie at 0 and one retrain's worth is all it can use. Caches
  usually stay far below the cap: eviction keeps only negatives scoring >= -1.2;
- the positives: all ground-truth rows, P * D * 4 bytes;
- one retrain (one class at a time): the float64 design matrix, (P_c + M_c) * D * 8 bytes, plus
  liblinear's sparse copy while it trains, 16 bytes per nonzero value + 32 per row, i.e. up to
  (P_c + M_c) * D * 24 bytes for dense features (2.1 GB for 22,000 rows at D = 4096).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from svm.linear import (ClassSVM, FeatureScaler, Objective, as_float32, as_numpy, design_matrix,
                        linear_scores, svm_objective)

log = logging.getLogger(__name__)

HARD_THRESHOLD = -1.0001      # a negative scoring above this is hard (kept in the cache)
EVICT_THRESHOLD = -1.2        # after a retrain, cached negatives scoring below this are evicted
RETRAIN_LIMIT = 2000          # new hard negatives of a class that trigger its retrain
NEGATIVE_IOU = 0.3            # a row is a negative of a class below this IoU with all its boxes
MAX_CACHE = 20000             # cap on the hard negatives cached per class
# The score of a class that could not be trained (no positive, or no negative): far below any
# trained SVM's scores (which are of order 1), yet finite for result files and JSON.
UNTRAINED_INTERCEPT = -1000.0


@dataclass(frozen=True)
class MiningSettings:
    """The mining schedule (thresholds on SVM scores, counts of negatives)."""

    hard_threshold: float = HARD_THRESHOLD
    evict_threshold: float = EVICT_THRESHOLD
    retrain_limit: int = RETRAIN_LIMIT
    negative_iou: float = NEGATIVE_IOU
    max_cache: int = MAX_CACHE

    def __post_init__(self) -> None:
        if self.retrain_limit < 1 or self.max_cache < 1:
            raise ValueError("retrain_limit and max_cache must be positive")
        if self.evict_threshold > self.hard_threshold:
            raise ValueError("evict_threshold must not exceed hard_threshold (a newly cached "
                             "negative would be evicted at once)")


@dataclass(frozen=True)
class ImageBatch:
    """The rows of one training image.

    features: `[N, D]` fc7 features (numpy or torch, any float dtype; used as float32).
    gt_class: `[N]` ints, 0 for a proposal, c in 1..K for a ground-truth box of class c.
    max_iou:  `[N, K]` IoU of each row with the closest ground-truth box of each class (0 where
              the image has none); column c - 1 is class c.
    index:    the image's index in the keys of its negatives; defaults to its stream position.
    """

    features: Any
    gt_class: Any
    max_iou: Any
    index: int | None = None


@dataclass(frozen=True)
class RetrainEvent:
    """One retrain of one class: when, on what, the objective, and the cache after eviction."""

    label: int               # class label, 1..K
    images_seen: int
    n_positives: int
    n_negatives: int         # cached negatives trained on
    objective: Objective
    n_evicted: int
    cache_size: int          # after eviction

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["objective"] = {**asdict(self.objective), "total": self.objective.total}
        return out


@dataclass(frozen=True)
class ClassReport:
    """Where one class ended: positives, retrains, final cache, final objective."""

    label: int
    trained: bool
    n_positives: int
    n_retrains: int
    cache_size: int
    objective: float | None      # final primal objective
    hinge_loss: float | None     # its weighted hinge part (C included)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MiningResult:
    """The models (in the scaled feature space) and the record of the pass."""

    coef: np.ndarray                 # [K, D] float32
    intercept: np.ndarray            # [K] float32
    scale: float
    trained: np.ndarray              # [K] bool
    n_images: int
    events: list[RetrainEvent]
    reports: list[ClassReport]
    cache_keys: list[np.ndarray]     # per class, [M, 2] int64 (image index, row index)


class RowStore:
    """Float32 rows that grow by chunks, joined into one array only when asked (appending to
    one array per image would copy the whole store every time)."""

    def __init__(self, n_features: int) -> None:
        self._chunks = [np.empty((0, n_features), dtype=np.float32)]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, rows: np.ndarray) -> None:
        self._chunks.append(rows)
        self._size += len(rows)

    def array(self) -> np.ndarray:
        """All rows `[n, D]`, joined once."""
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0]


class NegativeCache:
    """One class's cached hard negatives: keys `[M, 2]` (image index, row index), features
    `[M, D]` float32, and their scores `[M]` under the class's current model (kept valid: new
    rows come with the scores they were mined with, and a retrain rescores everything).
    New rows are held in chunks until `flush`."""

    def __init__(self, n_features: int) -> None:
        self.keys = np.empty((0, 2), dtype=np.int64)
        self.features = np.empty((0, n_features), dtype=np.float32)
        self.scores = np.empty(0, dtype=np.float32)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.added_since_retrain = 0

    def __len__(self) -> int:
        return len(self.keys) + sum(len(k) for k, _, _ in self._pending)

    def flush(self) -> None:
        """Join the pending chunks into `keys`, `features`, `scores`."""
        if self._pending:
            keys, features, scores = zip(*self._pending)
            self.keys = np.concatenate((self.keys, *keys))
            self.features = np.concatenate((self.features, *features))
            self.scores = np.concatenate((self.scores, *scores))
            self._pending = []

    def min_score(self) -> float:
        parts = [self.scores] + [s for _, _, s in self._pending]
        return min((float(p.min()) for p in parts if len(p)), default=np.inf)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` `[n, 2]` the cache holds: `[n]` bool."""
        self.flush()
        return np.isin(encode_keys(keys), encode_keys(self.keys))

    def add(self, keys: np.ndarray, features: np.ndarray, scores: np.ndarray,
            limit: int) -> int:
        """Cache new negatives, keeping at most `limit` (the highest-scoring; ties keep the
        earlier cached). Returns how many were added (before any trimming); 0 when the cache is
        full and none of them scores above its lowest."""
        if len(keys) == 0:
            return 0
        if len(self) >= limit and float(scores.max()) <= self.min_score():
            return 0
        self._pending.append((keys, features, scores.astype(np.float32, copy=False)))
        self.added_since_retrain += len(keys)
        if len(self) > limit:
            self.flush()
            best = np.sort(np.argsort(-self.scores, kind="stable")[:limit])
            self.keep(best, self.scores[best])
        return len(keys)

    def keep(self, rows: np.ndarray, scores: np.ndarray) -> int:
        """Keep only `rows` (a bool mask or indices into the flushed cache) with their new
        `scores`; returns how many were dropped."""
        self.flush()
        before = len(self.keys)
        self.keys, self.features = self.keys[rows], self.features[rows]
        self.scores = np.asarray(scores, dtype=np.float32)
        return before - len(self.keys)


def encode_keys(keys: np.ndarray) -> np.ndarray:
    """(image index, row index) pairs `[n, 2]` as single int64 values (row < 2**32)."""
    return (keys[:, 0].astype(np.int64) << 32) | keys[:, 1].astype(np.int64)


@dataclass
class MinerState:
    """Everything the pass updates: the models in raw feature space (scale folded in, for
    scoring the stream), the scaled-space models and the scale each was trained at, and per
    class its positives and negative cache."""

    n_classes: int
    n_features: int
    scaler: FeatureScaler
    fixed_scale: bool
    fixed_positives: bool
    positives: list[RowStore]
    caches: list[NegativeCache]
    raw_coef: np.ndarray             # [K, D] float32: coef * trained_scale, scores raw features
    intercept: np.ndarray            # [K] float32
    coef: np.ndarray                 # [K, D] float32, in the scaled space
    trained: np.ndarray              # [K] bool
    trained_scale: np.ndarray        # [K] the scale of each class's last retrain
    positives_at_retrain: np.ndarray  # [K] how many positives each last retrain used
    images_seen: int = 0
    seen_indices: set[int] = field(default_factory=set)
    events: list[RetrainEvent] = field(default_factory=list)


def read_batch(item: ImageBatch | Sequence[Any], position: int) -> ImageBatch:
    """One image's rows as numpy (features float32, gt_class int64, max_iou float32), checked;
    `item` is an `ImageBatch` or a `(features, gt_class, max_iou)` tuple."""
    batch = item if isinstance(item, ImageBatch) else ImageBatch(*item)
    features = as_float32(batch.features, 2)
    gt_class = as_numpy(batch.gt_class, np.int64).reshape(-1)
    max_iou = as_float32(batch.max_iou)
    if max_iou.ndim == 1 and len(features) == 0:
        max_iou = max_iou.reshape(0, -1)
    if max_iou.ndim != 2 or len(max_iou) != len(features) or len(gt_class) != len(features):
        raise ValueError(f"image {position}: features {features.shape}, gt_class "
                         f"{gt_class.shape} and max_iou {max_iou.shape} must be [N, D], [N] "
                         f"and [N, K]")
    if len(gt_class) and (gt_class.min() < 0 or gt_class.max() > max_iou.shape[1]):
        raise ValueError(f"image {position}: gt_class must be in 0..{max_iou.shape[1]}")
    index = position if batch.index is None else int(batch.index)
    return ImageBatch(features, gt_class, max_iou, index)


def start_state(n_classes: int, n_features: int, scaler: FeatureScaler | None,
                positives: tuple[Any, Any] | None, target_norm: float) -> MinerState:
    """The state before the first image: zero models, empty caches, and the given scaler or
    positives if any. With positives given, a class without any gets `UNTRAINED_INTERCEPT`, so
    none of its negatives is ever hard and it caches nothing."""
    state = MinerState(
        n_classes=n_classes, n_features=n_features,
        scaler=scaler if scaler is not None else FeatureScaler(target_norm),
        fixed_scale=scaler is not None, fixed_positives=positives is not None,
        positives=[RowStore(n_features) for _ in range(n_classes)],
        caches=[NegativeCache(n_features) for _ in range(n_classes)],
        raw_coef=np.zeros((n_classes, n_features), dtype=np.float32),
        intercept=np.zeros(n_classes, dtype=np.float32),
        coef=np.zeros((n_classes, n_features), dtype=np.float32),
        trained=np.zeros(n_classes, dtype=bool),
        trained_scale=np.zeros(n_classes), positives_at_retrain=np.zeros(n_classes, np.int64))
    if scaler is not None and not getattr(scaler, "n_samples_seen_", 0):
        raise NotFittedError("the scaler given to the mining pass has not been fitted")
    if positives is not None:
        features, labels = as_float32(positives[0], 2), as_numpy(positives[1], np.int64)
        if features.shape[1:] != (n_features,) or labels.shape != (len(features),):
            raise ValueError(f"positives must be ([P, {n_features}], [P]), got "
                             f"({features.shape}, {labels.shape})")
        for c in range(n_classes):
            state.positives[c].append(features[labels == c + 1])
        state.intercept[[len(p) == 0 for p in state.positives]] = UNTRAINED_INTERCEPT
    return state


def observe_image(state: MinerState, batch: ImageBatch) -> None:
    """Step 1: the running feature scale and the image's ground-truth rows as positives."""
    if not state.fixed_scale:
        state.scaler.partial_fit(batch.features)
    if not state.fixed_positives:
        for label in np.unique(batch.gt_class[batch.gt_class > 0]):
            state.positives[label - 1].append(batch.features[batch.gt_class == label])


def score_image(state: MinerState, features: np.ndarray) -> np.ndarray:
    """Step 2: scores `[N, K]` of every row for every class under the current models."""
    return linear_scores(features, state.raw_coef, state.intercept, 1.0)


def hard_negative_mask(scores: np.ndarray, gt_class: np.ndarray, max_iou: np.ndarray,
                       settings: MiningSettings) -> np.ndarray:
    """Step 3a: `[N, K]` True where a row is a negative of the class (IoU < 0.3 with all its
    boxes, and not one of its own ground-truth boxes) and scores above the hard threshold."""
    labels = np.arange(1, scores.shape[1] + 1)
    negative = (max_iou < settings.negative_iou) & (gt_class[:, None] != labels)
    return negative & (scores > settings.hard_threshold)


def cache_hard_negatives(state: MinerState, batch: ImageBatch, scores: np.ndarray,
                         hard: np.ndarray, settings: MiningSettings) -> None:
    """Step 3b: add each class's hard negatives of this image to its cache, skipping keys it
    already holds (possible only when an image index comes back)."""
    revisit = batch.index in state.seen_indices
    state.seen_indices.add(batch.index)
    for c in range(state.n_classes):
        rows = np.flatnonzero(hard[:, c])
        if len(rows) == 0:
            continue
        keys = np.stack([np.full(len(rows), batch.index, dtype=np.int64), rows], axis=1)
        cache = state.caches[c]
        if revisit:
            fresh = ~cache.contains(keys)
            rows, keys = rows[fresh], keys[fresh]
        limit = settings.max_cache if len(state.positives[c]) else min(settings.max_cache,
                                                                       settings.retrain_limit)
        cache.add(keys, batch.features[rows], scores[rows, c], limit)


def can_train(state: MinerState, c: int) -> bool:
    """A class needs at least one positive and one negative."""
    return len(state.positives[c]) > 0 and len(state.caches[c]) > 0


def due_for_retrain(state: MinerState, c: int, settings: MiningSettings) -> bool:
    """Step 4: retrain the first time it is possible, then after `retrain_limit` new negatives."""
    if not can_train(state, c):
        return False
    return not state.trained[c] or state.caches[c].added_since_retrain >= settings.retrain_limit


def changed_since_retrain(state: MinerState, c: int) -> bool:
    """Whether a retrain now could give another model than the last one."""
    return (not state.trained[c] or state.caches[c].added_since_retrain > 0
            or len(state.positives[c]) != state.positives_at_retrain[c]
            or state.scaler.scale_ != state.trained_scale[c])


def retrain_class(state: MinerState, c: int, svm: ClassSVM,
                  settings: MiningSettings) -> RetrainEvent:
    """Train class c on its positives + cached negatives at the current scale, install the
    model, rescore the cache and evict the negatives scoring below the eviction threshold."""
    cache = state.caches[c]
    cache.flush()
    positives = state.positives[c].array()
    scale = state.scaler.scale_
    x, y = design_matrix(positives, cache.features, scale)
    model = clone(svm).fit(x, y)
    scores = model.decision_function(x)
    del x, y  # free the float64 copy before the cache is trimmed
    n_pos = len(positives)
    objective = svm_objective(scores[:n_pos], scores[n_pos:], model.coef_, model.intercept_,
                              svm.C, svm.positive_weight, svm.intercept_scaling)
    n_negatives = len(cache.keys)
    keep = scores[n_pos:] >= settings.evict_threshold
    n_evicted = cache.keep(keep, scores[n_pos:][keep])
    cache.added_since_retrain = 0
    state.coef[c] = model.coef_
    state.raw_coef[c] = model.coef_ * scale
    state.intercept[c] = model.intercept_
    state.trained[c] = True
    state.trained_scale[c] = scale
    state.positives_at_retrain[c] = n_pos
    event = RetrainEvent(c + 1, state.images_seen, n_pos, n_negatives, objective, n_evicted,
                         len(cache.keys))
    state.events.append(event)
    log.debug("class %d retrained after %d images: %d pos, %d neg, objective %.4f, "
              "%d evicted, cache %d", c + 1, state.images_seen, n_pos, n_negatives,
              objective.total, n_evicted, len(cache.keys))
    return event


def finish(state: MinerState) -> MiningResult:
    """The result: models in the final scaled space, and per class its report and cache keys.
    A class never trained gets a zero weight vector and `UNTRAINED_INTERCEPT`."""
    intercept = state.intercept.copy()
    intercept[~state.trained] = UNTRAINED_INTERCEPT
    reports = []
    for c in range(state.n_classes):
        events = [e for e in state.events if e.label == c + 1]
        last = events[-1].objective if events else None
        reports.append(ClassReport(
            label=c + 1, trained=bool(state.trained[c]), n_positives=len(state.positives[c]),
            n_retrains=len(events), cache_size=len(state.caches[c]),
            objective=None if last is None else last.total,
            hinge_loss=None if last is None else last.hinge_loss))
    for cache in state.caches:
        cache.flush()
    return MiningResult(coef=state.coef.copy(), intercept=intercept,
                        scale=float(state.scaler.scale_), trained=state.trained.copy(),
                        n_images=state.images_seen, events=list(state.events), reports=reports,
                        cache_keys=[cache.keys for cache in state.caches])


def mine_hard_negatives(images: Iterable[ImageBatch | Sequence[Any]],
                        svm: ClassSVM | None = None,
                        settings: MiningSettings = MiningSettings(),
                        scaler: FeatureScaler | None = None,
                        positives: tuple[Any, Any] | None = None,
                        target_norm: float = 20.0) -> MiningResult:
    """Train one linear SVM per class with hard negative mining in a single pass over `images`
    (an iterable of `ImageBatch` or `(features, gt_class, max_iou)`, consumed once, one image
    in memory at a time).

    `svm`: the per-class trainer (`ClassSVM()`, the protocol's settings, by default).
    `scaler`: a fitted `FeatureScaler` to use throughout (R-CNN's order: the norm from a sample
    first); by default the scale is the running mean norm of all rows streamed so far, so each
    retrain uses the current estimate and the final retrain uses the whole pass's.
    `positives`: `(features [P, D], labels [P] in 1..K)`, all positives up front (R-CNN's order);
    by default the ground-truth rows of the stream.
    """
    svm = ClassSVM() if svm is None else svm
    state: MinerState | None = None
    for position, item in enumerate(images):
        batch = read_batch(item, position)
        if state is None:
            state = start_state(batch.max_iou.shape[1], batch.features.shape[1], scaler,
                                positives, target_norm)
        elif batch.features.shape[1:] != (state.n_features,) or \
                batch.max_iou.shape[1] != state.n_classes:
            raise ValueError(f"image {position}: expected {state.n_features} features and "
                             f"{state.n_classes} classes, got {batch.features.shape} features "
                             f"and max_iou {batch.max_iou.shape}")
        state.images_seen = position + 1
        observe_image(state, batch)
        scores = score_image(state, batch.features)
        hard = hard_negative_mask(scores, batch.gt_class, batch.max_iou, settings)
        cache_hard_negatives(state, batch, scores, hard, settings)
        for c in range(state.n_classes):
            if due_for_retrain(state, c, settings):
                retrain_class(state, c, svm, settings)
    if state is None:
        raise ValueError("no training images: the image stream was empty")
    for c in range(state.n_classes):
        if can_train(state, c) and changed_since_retrain(state, c):
            retrain_class(state, c, svm, settings)
    return finish(state)
