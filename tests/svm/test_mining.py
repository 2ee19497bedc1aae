"""The one-pass hard negative mining loop on synthetic streams: what it learns, what it caches,
when it retrains and evicts, how it streams, and its edge cases."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from svm import UNTRAINED_INTERCEPT, FeatureScaler, ImageBatch, LinearSVMDetector
from svm.mining import MiningSettings, NegativeCache, hard_negative_mask, mine_hard_negatives

EASY, HARD, NEAR, GT = 0, 1, 2, 3


def kinds_of(problem, keys):
    """The kind and related class of cached rows, from their (image, row) keys."""
    images = {}
    kind, related = [], []
    for image, row in keys.tolist():
        if image not in images:
            images[image] = problem.image(image)
        kind.append(images[image].kind[row])
        related.append(images[image].related[row])
    return np.array(kind, dtype=int), np.array(related, dtype=int)


def test_mining_reaches_a_good_ap_on_held_out_images(trained):
    problem, detector = trained
    held_out = problem.images(30, start=1000)
    features = np.concatenate([im.features for im in held_out])
    gt_class = np.concatenate([im.gt_class for im in held_out])
    max_iou = np.concatenate([im.max_iou for im in held_out])
    scores = detector.decision_function(features)
    for c in range(1, problem.n_classes + 1):
        # ground truth against this class's negatives (IoU < 0.3), as the detector faces them
        rows = (gt_class == c) | (max_iou[:, c - 1] < 0.3)
        ap = average_precision_score(gt_class[rows] == c, scores[rows, c - 1])
        assert ap > 0.9, (c, ap)
    assert detector.trained_.all()


def test_the_cache_holds_the_hard_negatives_not_the_easy_ones(trained):
    problem, detector = trained
    for c in range(1, problem.n_classes + 1):
        keys = detector.cache_keys_[c - 1]
        kind, related = kinds_of(problem, keys)
        # never its own ground truth nor its own near boxes (IoU >= 0.3 are not negatives)
        assert not np.any((related == c) & ((kind == GT) | (kind == NEAR)))
        own_hard = (related == c) & (kind == HARD)
        assert own_hard.mean() > 0.8, np.bincount(kind)
        assert (kind == EASY).mean() < 0.05
        # most of this class's hard negatives of the stream are in the cache ...
        total_hard = sum(int(np.sum((im.kind == HARD) & (im.related == c)))
                         for im in problem.images(60))
        assert own_hard.sum() > 0.5 * total_hard
        # ... while the first image's easy negatives, all cached under the zero model, are gone
        first = keys[keys[:, 0] == 0, 1]
        assert not np.any(problem.image(0).kind[first] == EASY)
        # keys are unique (image index, row index) pairs
        assert len(np.unique(keys, axis=0)) == len(keys)


def test_the_final_cache_survives_eviction_under_the_final_model(trained):
    problem, detector = trained
    for c in range(1, problem.n_classes + 1):
        keys = detector.cache_keys_[c - 1]
        rows = np.stack([problem.image(i).features[r] for i, r in keys.tolist()])
        assert detector.decision_function(rows)[:, c - 1].min() >= -1.2 - 1e-4


def test_retrain_log_and_reports(trained):
    problem, detector = trained
    events = detector.retrains_
    for c in range(1, problem.n_classes + 1):
        mine = [e for e in events if e.label == c]
        report = detector.reports_[c - 1]
        assert report.n_retrains == len(mine) >= 3
        assert report.cache_size == mine[-1].cache_size == len(detector.cache_keys_[c - 1])
        assert report.objective == pytest.approx(mine[-1].objective.total)
        assert mine[-1].images_seen == 60  # the final retrain after the pass
        assert all(e.n_evicted > 0 for e in mine[:-1])
    assert detector.n_images_seen_ == 60


def counting_stream(n_images, n_negatives, n_classes=2, dim=8, seed=0):
    """Every image: one ground-truth row per class and `n_negatives` background rows."""
    rng = np.random.default_rng(seed)
    for _ in range(n_images):
        features = rng.normal(size=(n_classes + n_negatives, dim)).astype(np.float32)
        features[:n_classes] += 3.0
        gt_class = np.r_[np.arange(1, n_classes + 1), np.zeros(n_negatives, dtype=int)]
        max_iou = np.zeros((len(features), n_classes), dtype=np.float32)
        max_iou[np.arange(n_classes), np.arange(n_classes)] = 1.0
        yield features, gt_class, max_iou


def test_retrain_fires_once_retrain_limit_new_negatives_are_cached():
    # every negative is hard and none is ever evicted: each image adds 30 (+1, the other class's
    # ground truth) new negatives per class, so the class retrains at image 1 (its first
    # chance), then each time 100 more have come: after images 5, 9, 13, ...
    detector = LinearSVMDetector(retrain_limit=100, hard_threshold=-1e9, evict_threshold=-1e9)
    detector.fit(counting_stream(19, 30))
    for c in (1, 2):
        seen = [e.images_seen for e in detector.retrains_ if e.label == c]
        assert seen == [1, 5, 9, 13, 17, 19]
        assert detector.reports_[c - 1].cache_size == 19 * 31
        negatives = [e.n_negatives for e in detector.retrains_ if e.label == c]
        assert np.all(np.diff(negatives)[:-1] >= 100)


def test_retrain_does_not_fire_below_the_limit():
    detector = LinearSVMDetector(retrain_limit=10_000)
    detector.fit(counting_stream(6, 40, dim=4))
    for c in (1, 2):
        events = [e for e in detector.retrains_ if e.label == c]
        assert [e.images_seen for e in events] == [1, 6]  # first chance, end of the pass
        assert events[0].n_negatives == 41 and events[1].n_positives == 6


def test_negative_cache_eviction_and_cap_keep_the_highest_scores():
    cache = NegativeCache(n_features=2)
    keys = np.stack([np.zeros(6, dtype=np.int64), np.arange(6)], axis=1)
    scores = np.array([-0.5, -1.5, 0.2, -1.1, -1.3, 0.9], dtype=np.float32)
    features = np.repeat(scores[:, None], 2, axis=1)
    assert cache.add(keys, features, scores, limit=4) == 6
    assert sorted(cache.keys[:, 1].tolist()) == [0, 2, 3, 5] and len(cache) == 4
    assert np.array_equal(cache.features[:, 0], cache.scores)
    # a full cache takes nothing that does not beat its lowest score ...
    low = np.array([[1, 0]]), np.zeros((1, 2), np.float32), np.array([-2.0], np.float32)
    assert cache.add(*low, limit=4) == 0 and len(cache) == 4
    # ... and evicts by the scores it is given
    dropped = cache.keep(cache.scores >= -1.2, cache.scores[cache.scores >= -1.2])
    assert dropped == 0 and cache.contains(np.array([[0, 2], [0, 1]])).tolist() == [True, False]
    assert cache.keep(cache.scores >= 0.0, cache.scores[cache.scores >= 0.0]) == 2


def test_max_cache_bounds_every_cache(make_synthetic):
    problem = make_synthetic()
    detector = LinearSVMDetector(retrain_limit=50, max_cache=60).fit(problem.stream(20))
    assert all(e.n_negatives <= 60 for e in detector.retrains_)
    assert all(r.cache_size <= 60 for r in detector.reports_)


def test_hard_negative_mask_uses_iou_own_ground_truth_and_scores():
    scores = np.array([[0.0, 0.0], [0.0, -2.0], [0.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    gt_class = np.array([0, 0, 1, 0])
    max_iou = np.array([[0.1, 0.0], [0.0, 0.0], [0.0, 0.0], [0.3, 0.29]], dtype=np.float32)
    mask = hard_negative_mask(scores, gt_class, max_iou, MiningSettings())
    assert mask.tolist() == [[True, True], [True, False], [False, True], [False, True]]


def test_the_stream_is_consumed_once_and_never_held(make_synthetic):
    problem = make_synthetic()
    alive = []
    produced = []

    def stream():
        for i in range(25):
            image = problem.image(i)
            assert sum(ref() is not None for ref in alive) <= 1  # only the previous image
            alive.append(weakref.ref(image.features))
            produced.append(i)
            yield ImageBatch(image.features, image.gt_class, image.max_iou)

    images = stream()
    detector = LinearSVMDetector(retrain_limit=100).fit(images)
    assert produced == list(range(25)) and next(images, None) is None
    assert detector.n_images_seen_ == 25


def test_a_repeated_image_adds_no_duplicate_negatives(make_synthetic):
    problem = make_synthetic()
    image = problem.image(0)
    again = ImageBatch(image.features, image.gt_class, image.max_iou, index=0)
    detector = LinearSVMDetector(retrain_limit=10_000, hard_threshold=-1e9,
                                 evict_threshold=-1e9)
    detector.fit([again, again, again])
    for keys in detector.cache_keys_:
        assert len(np.unique(keys, axis=0)) == len(keys)
        assert len(keys) > 0 and np.all(keys[:, 0] == 0)


def test_a_class_without_positives_scores_untrained_and_caches_little(make_synthetic):
    problem = make_synthetic(absent=(3,))
    detector = LinearSVMDetector(retrain_limit=50).fit(problem.stream(30))
    assert detector.trained_.tolist() == [True, True, False]
    scores = detector.decision_function(problem.image(500).features)
    assert np.all(scores[:, 2] == UNTRAINED_INTERCEPT)
    assert scores[:, :2].min() > UNTRAINED_INTERCEPT / 10
    report = detector.reports_[2]
    assert report.n_positives == 0 and report.n_retrains == 0 and report.objective is None
    assert report.cache_size <= 50  # zero model: all tie, one retrain's worth kept


def test_positives_and_scale_given_up_front(make_synthetic):
    problem = make_synthetic(absent=(3,))
    images = problem.images(30)
    scaler = FeatureScaler().fit(np.concatenate([im.features for im in images[:5]]))
    positives = (np.concatenate([im.features[im.gt_class > 0] for im in images]),
                 np.concatenate([im.gt_class[im.gt_class > 0] for im in images]))
    detector = LinearSVMDetector(retrain_limit=50)
    detector.fit((im.batch() for im in images), positives=positives, scaler=scaler)
    assert detector.scale_ == scaler.scale_
    assert [r.n_positives for r in detector.reports_] == [
        int(np.sum(positives[1] == c)) for c in (1, 2, 3)]
    # a class known to have no positive never caches a negative
    assert detector.reports_[2].cache_size == 0 and not detector.trained_[2]
    assert detector.trained_[:2].all()


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="empty"):
        LinearSVMDetector().fit(iter([]))
    with pytest.raises(ValueError, match="must be"):
        LinearSVMDetector().fit([(np.zeros((3, 4)), np.zeros(2), np.zeros((3, 2)))])
    with pytest.raises(ValueError, match="gt_class"):
        LinearSVMDetector().fit([(np.zeros((3, 4)), np.array([0, 0, 3]), np.zeros((3, 2)))])
    good = (np.zeros((3, 4)), np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="expected 4 features"):
        LinearSVMDetector().fit([good, (np.zeros((3, 5)), np.zeros(3), np.zeros((3, 2)))])
    with pytest.raises(ValueError, match="evict_threshold"):
        MiningSettings(hard_threshold=-1.5, evict_threshold=-1.2)


def test_images_without_rows_and_torch_inputs_are_accepted(make_synthetic):
    import torch

    problem = make_synthetic()

    def stream():
        for i in range(12):
            yield torch.zeros((0, 32)), torch.zeros(0, dtype=torch.long), torch.zeros((0, 3))
            image = problem.image(i)
            yield (torch.from_numpy(image.features), torch.from_numpy(image.gt_class),
                   torch.from_numpy(image.max_iou))

    result = mine_hard_negatives(stream(), settings=MiningSettings(retrain_limit=100))
    assert result.n_images == 24 and result.trained.all()
