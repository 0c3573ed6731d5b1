"""The bench summary's verdicts (bench/summary.py): targets, and the note when the load changed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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


def test_paired_ratio_is_the_median_of_per_round_ratios_with_an_interval():
    # Load doubles in the second half of the rounds; the setup costs 1.05 x the reference in each.
    reference = [1.0] * 10 + [2.0] * 10
    times = [1.05 * r for r in reference]
    value, low, high = summary.paired_ratio(times, reference)
    assert abs(value - 1.05) < 1e-12 and abs(low - 1.05) < 1e-12 and abs(high - 1.05) < 1e-12
    # Spread in the ratios widens the interval around the median.
    noisy = [t * (1 + 0.04 * ((i % 5) - 2)) for i, t in enumerate(times)]
    value, low, high = summary.paired_ratio(noisy, reference)
    assert low < value < high and high - low > 0.02
    assert summary.paired_ratio([1.0], [1.0]) is None


def test_paired_ratio_rejects_times_from_different_rounds():
    with pytest.raises(ValueError, match="3 times against 2 reference times"):
        summary.paired_ratio([1.0, 1.0, 1.0], [1.0, 1.0])


def _rounds(ratio: float, spread: float) -> summary.Results:
    floor = [0.8 + 0.01 * i for i in range(20)]
    peftcore = [f * (ratio + spread * ((i % 3) - 1)) for i, f in enumerate(floor)]
    return summary.Results(interleaved_s={"floor": 0.9, "peftcore_p0.1": 0.9 * ratio},
                           interleaved_rounds_s={"floor": floor, "peftcore_p0.1": peftcore})


def test_a_paired_target_is_met_only_when_its_whole_interval_is():
    met = _rounds(1.05, 0.01).render(threads=2)
    assert "paired per round: / floor" in met and " 1.050  (<= 1.10)  met [" in met
    assert "(<= 1.10)  NOT met [" in _rounds(1.20, 0.01).render(threads=2)
    assert "(<= 1.10)  undecided: the interval spans the limit [" in _rounds(1.10, 0.05).render(threads=2)


def test_per_op_alternating_runs_are_summarised_as_paired_ratios():
    base = [0.004 + 0.0001 * (i % 4) for i in range(30)]
    op = [1.3 * t for t in base]
    text = summary.Results(ops_interleaved=[("2048x384->384", "cpp", base, op)]).render(threads=2)
    assert "lora_linear fwd+bwd, alternating with linear" in text
    assert "1.300 [1.300, 1.300]" in text.splitlines()[-1]
