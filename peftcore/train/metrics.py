"""Classification metrics, computed with scikit-learn."""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class ClassificationReport:
    """Metrics of predictions against gold labels.

    Attributes:
        accuracy: fraction of correct predictions.
        macro_f1: unweighted mean of the per-class F1 scores.
        precision: per-class precision, by label name.
        recall: per-class recall, by label name.
        confusion: confusion matrix, rows = gold, columns = predicted, in ``labels`` order.
        labels: label names.
    """

    accuracy: float
    macro_f1: float
    precision: dict[str, float]
    recall: dict[str, float]
    confusion: list[list[int]]
    labels: list[str]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def classification_report(gold: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> ClassificationReport:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix.

    Args:
        gold: gold label ids.
        predicted: predicted label ids.
        labels: label names, indexed by id.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    ids = list(range(len(labels)))
    precision, recall, _, _ = precision_recall_fscore_support(gold, predicted, labels=ids, zero_division=0)
    return ClassificationReport(
        accuracy=float(accuracy_score(gold, predicted)),
        macro_f1=float(f1_score(gold, predicted, labels=ids, average="macro", zero_division=0)),
        precision={labels[i]: float(precision[i]) for i in ids},
        recall={labels[i]: float(recall[i]) for i in ids},
        confusion=confusion_matrix(gold, predicted, labels=ids).tolist(),
        labels=list(labels),
    )
