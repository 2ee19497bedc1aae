"""Per-class linear SVMs trained with hard negative mining (R-CNN / SPP-net protocol), on feature
batches given as numpy arrays or torch tensors; independent of the torch models.

- `svm.linear`: `FeatureScaler` (mean norm 20), `ClassSVM` (one class, liblinear's L1-loss dual
  SVM with C = 0.001, positive weight 2, bias feature 10), the objective, multi-class scoring.
- `svm.mining`: the one-pass hard negative mining loop over streamed images.
- `svm.detector`: `LinearSVMDetector`, the K classes as one estimator, saved as arrays + JSON.
"""

from svm.detector import LinearSVMDetector
from svm.linear import ClassSVM, FeatureScaler, Objective, linear_scores, svm_objective
from svm.mining import (UNTRAINED_INTERCEPT, ClassReport, ImageBatch, MiningResult,
                        MiningSettings, RetrainEvent, mine_hard_negatives)

__all__ = [
    "ClassReport", "ClassSVM", "FeatureScaler", "ImageBatch", "LinearSVMDetector", "MiningResult",
    "MiningSettings", "Objective", "RetrainEvent", "UNTRAINED_INTERCEPT", "linear_scores",
    "mine_hard_negatives", "svm_objective",
]
