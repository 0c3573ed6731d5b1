"""The bench summary's verdicts (bench/summary.py): targets, and the note when the load changed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_summary", Path(__file__).resolve().parents[1] / "bench" / "summary.py")
summary = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = summary  # dataclasses look their module up there
_spec.loader.exec_module(summary)


def _results(floor_own: float, floor_interleaved: float) -> summary.Results:
    return summary.Results(
        step_s={"floor": floor_own, "peftcore_p0.1": 1.0, "hf_peft_p0.1": 1.6},
        interleaved_s={"floor": floor_interleaved, "peftcore_p0.1": 1.2, "hf_peft_p0.1": 1.7},
    )


def test_targets_are_judged_from_the_measured_ratios():
    text = _results(1.0, 1.0).render(threads=2)
    assert "peftcore step / floor step                                 1.00  (<= 1.10)  met" in text
    assert "the same, setups interleaved: / floor                    1.20  (<= 1.10)  NOT met" in text


def test_a_floor_that_measured_differently_alone_and_interleaved_is_flagged():
    steady, loaded = _results(1.02, 1.00), _results(1.24, 1.12)
    assert steady.drift() == []
    (note,) = loaded.drift()
    assert "floor step took 1.240 s in its own test and 1.120 s interleaved (11% apart)" in note
    assert note in loaded.render(threads=2)
