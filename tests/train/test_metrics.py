"""Metrics: scikit-learn's numbers, checked against hand-counted values on a small example."""

import math

import pytest

from peftcore.train.metrics import classification_report, regression_report


def test_classification_report_by_hand():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    r = classification_report(gold, pred, ["a", "b", "c"])
    assert r.accuracy == pytest.approx(4 / 6)
    assert r.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r.precision == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.5})
    assert r.recall == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 1.0})
    f1 = [2 * p * q / (p + q) for p, q in ((1.0, 2 / 3), (0.5, 0.5), (0.5, 1.0))]
    assert r.macro_f1 == pytest.approx(sum(f1) / 3)
    text = str(r)
    assert "macro-F1" in text and text.splitlines()[2].split()[:3] == ["a", "1.000", "0.667"]
    assert r.as_dict()["confusion"] == r.confusion


def test_a_class_never_predicted_counts_as_zero_not_an_error():
    r = classification_report([0, 1, 2], [0, 0, 0], ["a", "b", "c"])
    assert r.precision["b"] == 0.0 and r.recall["b"] == 0.0 and r.confusion[2] == [1, 0, 0]


def test_regression_report_by_hand():
    r = regression_report([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert r.mse == pytest.approx(4 / 3) and r.mae == pytest.approx(2 / 3)
    assert r.r2 == pytest.approx(1 - 4 / 2)
    assert math.isnan(regression_report([1.0], [2.0]).r2)
