"""A synthetic detection problem for the SVM stage: Gaussian clusters per class in a small feature
space, many images each with a few ground-truth rows and many proposals of known kind."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

EASY, HARD, NEAR, GT = 0, 1, 2, 3


@dataclass
class SyntheticImage:
    features: np.ndarray   # [N, D] float32
    gt_class: np.ndarray   # [N] 0 or 1..K
    max_iou: np.ndarray    # [N, K]
    kind: np.ndarray       # [N] EASY, HARD, NEAR or GT
    related: np.ndarray    # [N] the class a GT / NEAR / HARD row belongs to, 0 for EASY

    def batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.features, self.gt_class, self.max_iou


@dataclass
class Synthetic:
    """Class c's ground truth lies around mean_c; its NEAR proposals (IoU 0.5-0.9, neither
    positive nor negative for c) around 0.9 mean_c; its HARD negatives (IoU < 0.3) around
    0.45 mean_c; EASY background proposals (IoU 0 with everything) around a common point away
    from all classes. `absent` classes never occur."""

    n_classes: int = 3
    dim: int = 32
    n_easy: int = 40
    n_hard: int = 3
    n_near: int = 2
    noise: float = 0.3
    seed: int = 0
    absent: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        m = np.random.default_rng(self.seed).normal(size=(self.n_classes, self.dim))
        self.means = 3.0 * m / np.linalg.norm(m, axis=1, keepdims=True)

    def image(self, i: int) -> SyntheticImage:
        rng = np.random.default_rng((self.seed, i))
        k, d = self.n_classes, self.dim
        present = [c for c in range(1, k + 1) if c not in self.absent]
        classes = rng.choice(present, size=min(len(present), int(rng.integers(1, 3))),
                             replace=False)
        rows: list[tuple[np.ndarray, int, np.ndarray, int, int]] = []
        for c in classes:
            mean = self.means[c - 1]
            for kind, count, factor, iou_range in ((GT, int(rng.integers(1, 3)), 1.0, (1.0, 1.0)),
                                                   (NEAR, self.n_near, 0.9, (0.5, 0.9)),
                                                   (HARD, self.n_hard, 0.45, (0.0, 0.29))):
                for _ in range(count):
                    iou = np.zeros(k)
                    iou[c - 1] = rng.uniform(*iou_range)
                    rows.append((factor * mean + self.noise * rng.normal(size=d),
                                 c if kind == GT else 0, iou, kind, c))
        for _ in range(self.n_easy):
            rows.append((-0.3 * self.means.mean(0) + self.noise * rng.normal(size=d), 0,
                         np.zeros(k), EASY, 0))
        order = rng.permutation(len(rows))
        features, gt_class, max_iou, kind, related = zip(*(rows[j] for j in order))
        return SyntheticImage(np.array(features, dtype=np.float32), np.array(gt_class),
                              np.array(max_iou, dtype=np.float32), np.array(kind),
                              np.array(related))

    def images(self, n: int, start: int = 0) -> list[SyntheticImage]:
        return [self.image(i) for i in range(start, start + n)]

    def stream(self, n: int):
        """A generator of `(features, gt_class, max_iou)`, one image at a time."""
        for i in range(n):
            yield self.image(i).batch()


@pytest.fixture
def synthetic() -> Synthetic:
    return Synthetic()


@pytest.fixture
def make_synthetic():
    return Synthetic


@pytest.fixture(scope="session")
def trained():
    """One protocol-default detector (but retrain_limit 100) mined on 60 synthetic images, shared
    by the tests that only inspect it."""
    from svm import LinearSVMDetector

    problem = Synthetic()
    return problem, LinearSVMDetector(retrain_limit=100).fit(problem.stream(60))
