"""Setups measured alternating call by call, so that load which comes and goes on a shared
machine hits them alike (``bench/test_e2e.py``, ``bench/test_ops.py``)."""

from __future__ import annotations

import statistics
import time


def interleaved(benchmark, calls: dict, rounds: int) -> dict[str, list[float]]:
    """Runs ``calls`` one after another each round, the order rotated by one every round (each
    runs first, in the middle and last equally often); the times of each over the rounds, 2
    warm-up rounds dropped. Load that comes and goes on a shared machine hits all alike, so
    ratios taken round by round (``summary.paired_ratio``) are steadier than across separate
    tests. The benchmark's own number is a round."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    done = [0]

    def one_round():
        first = done[0] % len(names)
        for name in names[first:] + names[:first]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
        done[0] += 1

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=2, iterations=1)
    kept = {name: t[2:] for name, t in times.items()}  # warm-up rounds dropped
    benchmark.extra_info.update({f"median_{name}_s": statistics.median(t) for name, t in kept.items()})
    return kept
