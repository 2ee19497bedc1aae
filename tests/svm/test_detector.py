"""`LinearSVMDetector`: protocol defaults, scoring, and saving without pickles."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from svm import LinearSVMDetector


def test_defaults_are_the_protocol():
    params = LinearSVMDetector().get_params()
    assert params["C"] == 0.001
    assert params["positive_weight"] == 2.0
    assert params["intercept_scaling"] == 10.0
    assert params["target_norm"] == 20.0
    assert params["hard_threshold"] == -1.0001
    assert params["evict_threshold"] == -1.2
    assert params["retrain_limit"] == 2000
    assert params["negative_iou"] == 0.3
    svc = LinearSVMDetector().class_svm().make_svc()
    assert svc.loss == "hinge" and svc.dual is True
    assert svc.class_weight == {1: 2.0, -1: 1.0} and svc.intercept_scaling == 10.0
    assert clone(LinearSVMDetector(C=0.5)).C == 0.5


def test_decision_function_shapes_scaling_and_torch_input(trained):
    problem, detector = trained
    features = problem.image(2000).features
    scores = detector.decision_function(features)
    assert scores.shape == (len(features), problem.n_classes) and scores.dtype == np.float32
    assert detector.coef_.shape == (problem.n_classes, problem.dim)
    expected = (features * detector.scale_) @ detector.coef_.T + detector.intercept_
    assert np.allclose(scores, expected, atol=1e-4)
    assert np.array_equal(detector.decision_function(torch.from_numpy(features)), scores)
    with pytest.raises(ValueError, match="expected 32 features"):
        detector.decision_function(features[:, :5])


def test_unfitted_detector_raises():
    with pytest.raises(NotFittedError):
        LinearSVMDetector().decision_function(np.zeros((1, 3)))


def test_state_round_trip_gives_identical_scores(trained):
    problem, detector = trained
    features = problem.image(3000).features
    state = detector.to_state()
    assert set(state) == {"coef", "intercept", "scale", "trained", "config"}
    assert all(isinstance(state[k], np.ndarray) for k in ("coef", "intercept", "scale", "trained"))
    json.dumps(state["config"])
    loaded = LinearSVMDetector.from_state(state)
    assert loaded.get_params() == detector.get_params()
    assert np.array_equal(loaded.decision_function(features), detector.decision_function(features))


def test_state_through_npz_and_torch_weights_only(trained):
    problem, detector = trained
    features = problem.image(3001).features
    expected = detector.decision_function(features)
    state = detector.to_state()

    buffer = io.BytesIO()
    np.savez(buffer, **{k: v for k, v in state.items() if k != "config"},
             config=json.dumps(state["config"]))
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as npz:
        from_npz = LinearSVMDetector.from_state(dict(npz))
    assert np.array_equal(from_npz.decision_function(features), expected)

    buffer = io.BytesIO()
    torch.save({k: (v if k == "config" else torch.from_numpy(np.asarray(v)))
                for k, v in state.items()}, buffer)
    buffer.seek(0)
    from_torch = LinearSVMDetector.from_state(torch.load(buffer, weights_only=True))
    assert np.array_equal(from_torch.decision_function(features), expected)


def test_from_state_rejects_foreign_states(trained):
    _, detector = trained
    state = detector.to_state()
    with pytest.raises(ValueError, match="missing coef"):
        LinearSVMDetector.from_state({k: v for k, v in state.items() if k != "coef"})
    with pytest.raises(ValueError, match="format"):
        LinearSVMDetector.from_state({**state, "config": {**state["config"], "format": "x"}})


def test_summary_is_json(trained):
    _, detector = trained
    summary = json.loads(json.dumps(detector.summary()))
    assert summary["n_images"] == 60 and len(summary["classes"]) == 3
    assert summary["retrains"][0]["objective"]["total"] > 0
