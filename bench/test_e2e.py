"""End to end: training step time and peak memory per setup, and inference with an unmerged
adapter (the setups are in ``bench/e2e.py``; the summary table prints at the end of the run).

Step time: pytest-benchmark, in this process (``PEFTCORE_BENCH_ROUNDS`` rounds after 2 warm-up
steps, median). Peak memory: the peak RSS of a fresh subprocess that builds the same setup and
runs 3 steps (its ``VmHWM``, see ``e2e.peak_rss_mb``), since a process's peak cannot be reset
once reached.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import e2e
from interleave import interleaved

HERE = Path(__file__).resolve().parent
ROUNDS = int(os.environ.get("PEFTCORE_BENCH_ROUNDS", "10"))
# The comparisons that matter sit next to each other, so machine drift affects them least.
ORDER = ("floor", "peftcore_p0.1", "hf_peft_p0.1", "hf_peft_p0", "peftcore_p0", "full", "peftcore_ref_p0.1")
assert set(ORDER) == set(e2e.SETUPS)


def _peak_rss_mb(setup: str) -> float:
    env = dict(os.environ, PEFTCORE_BENCH_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, str(HERE / "e2e.py"), setup, "--steps", "3", "--warmup", "1"],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/e2e.py {setup} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


@pytest.mark.parametrize("setup", ORDER)
def test_training_step(benchmark, results, setup):
    built = e2e.build(setup)
    slow = setup.startswith("peftcore_ref")  # the reference backend is the slow specification
    benchmark.group = "training step"
    benchmark.extra_info["trainable_parameters"] = built.trainable
    benchmark.pedantic(built.step, rounds=3 if slow else ROUNDS, warmup_rounds=1 if slow else 2, iterations=1)
    results.step_s[setup] = benchmark.stats.stats.median
    results.step_min_s[setup] = benchmark.stats.stats.min
    del built
    gc.collect()
    results.peak_mb[setup] = benchmark.extra_info["peak_rss_mb"] = _peak_rss_mb(setup)


def test_interleaved_training_steps(benchmark, results):
    """floor, peftcore and HF PEFT alternating step by step (the targets' drift-free reading),
    4 x ``PEFTCORE_BENCH_ROUNDS`` rounds: the paired ratios' intervals need that many on a
    shared machine."""
    data = e2e.batch()
    setups = {name: e2e.build(name, data) for name in ("floor", "peftcore_p0.1", "hf_peft_p0.1")}
    benchmark.group = "training step, interleaved"
    rounds = interleaved(benchmark, {n: s.step for n, s in setups.items()}, 4 * ROUNDS)
    results.interleaved_rounds_s.update(rounds)
    results.interleaved_s.update({name: statistics.median(t) for name, t in rounds.items()})


def test_interleaved_inference(benchmark, results):
    """Base, peftcore (unmerged) and HF PEFT (unmerged) forwards alternating, 10 x
    ``PEFTCORE_BENCH_ROUNDS`` rounds (a forward is short: the rounds are cheap, and the paired
    ratio's interval narrows with them)."""
    calls = {}
    for name in ("base", "peftcore", "hf_peft"):
        model, data = e2e.build_inference(name)
        calls[name] = _no_grad_forward(model, data)
    benchmark.group = "inference, interleaved"
    rounds = interleaved(benchmark, calls, 10 * ROUNDS)
    results.inference_interleaved_rounds_s.update(rounds)
    results.inference_interleaved_s.update({name: statistics.median(t) for name, t in rounds.items()})


def _no_grad_forward(model, data):
    def forward():
        with torch.no_grad():
            return model(**data).logits

    return forward


@pytest.mark.parametrize("setup", ["base", "peftcore", "hf_peft"])
def test_inference(benchmark, results, setup):
    model, data = e2e.build_inference(setup)
    benchmark.group = "inference"
    benchmark.pedantic(_no_grad_forward(model, data), rounds=ROUNDS * 2, warmup_rounds=3, iterations=1)
    results.inference_s[setup] = benchmark.stats.stats.median
