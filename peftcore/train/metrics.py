"""Classification and regression metrics, computed with scikit-learn."""

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

    def __str__(self) -> str:
        width = max(8, *(len(label) for label in self.labels))
        lines = [f"accuracy {self.accuracy:.4f}, macro-F1 {self.macro_f1:.4f}",
                 f"{'label':<{width}}  precision  recall  | confusion (rows: gold, columns: predicted)"]
        for i, label in enumerate(self.labels):
            row = " ".join(f"{n:>4}" for n in self.confusion[i])
            lines.append(f"{label:<{width}}  {self.precision[label]:>9.3f}  {self.recall[label]:>6.3f}  | {row}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RegressionReport:
    """Metrics of real-valued predictions.

    Attributes:
        mse: mean squared error.
        mae: mean absolute error.
        r2: coefficient of determination (1 is perfect, 0 is predicting the mean).
    """

    mse: float
    mae: float
    r2: float

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


def regression_report(gold: Sequence[float], predicted: Sequence[float]) -> RegressionReport:
    """Mean squared error, mean absolute error and R^2, with scikit-learn."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    return RegressionReport(
        mse=float(mean_squared_error(gold, predicted)),
        mae=float(mean_absolute_error(gold, predicted)),
        r2=float(r2_score(gold, predicted)) if len(gold) > 1 else float("nan"),
    )
