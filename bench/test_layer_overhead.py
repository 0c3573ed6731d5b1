"""Per-forward overhead of an adapter layer on a small layer, where fixed per-call costs (backend
dispatch, Python around the op) show rather than the matmuls.

A 32 x 64 -> 64 ``nn.Linear`` (fp32, ``no_grad``, eval) alone, wrapped with LoRA (rank 8, ``auto``
backend: ``cpp`` where the extension is built), and wrapped with a sequential bottleneck adapter
(size 8, GELU). Each wrapped layer is measured alternating with the plain one, 100 calls of each
per round, and timed in CPU time of the calling thread (``time.thread_time``; torch runs with one
thread here), not wall time: on a shared machine wall time counts the time other processes hold
the core, CPU time only what the forward itself costs. The summary is the median per call over
the rounds, and the layer's cost over the plain ``nn.Linear``. Run (about 20 s)::

    python -m pytest bench/test_layer_overhead.py --benchmark-only -q -s
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

import peftcore

M, K, N = 32, 64, 64
ROUNDS, CALLS = 300, 100


def _layer(method: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N))
    if method == "lora":
        peftcore.wrap(model, "lora", rank=8)
    elif method == "adapter":
        peftcore.wrap(model, "adapter", targets=["0"], size=8, activation="gelu")
    return model.eval()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # thread_time sees the calling thread only
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_layer_forward_overhead(benchmark, one_thread, method):
    models = {"linear": _layer(None), method: _layer(method)}
    x = torch.randn(M, K)
    per_call: dict[str, list[float]] = {name: [] for name in models}

    def one_round():
        with torch.no_grad():
            for name, model in models.items():
                start = time.thread_time()
                for _ in range(CALLS):
                    model(x)
                per_call[name].append((time.thread_time() - start) / CALLS)

    benchmark.group = f"{method} layer forward {M}x{K}->{N}, no_grad, 2 x {CALLS} calls per round"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=5, iterations=1)
    base_us, layer_us = (statistics.median(per_call[name][5:]) * 1e6 for name in ("linear", method))
    benchmark.extra_info.update({"layer_us": layer_us, "linear_us": base_us})
    print(f"\n{method:<8} forward {layer_us:7.2f} us   nn.Linear alone {base_us:6.2f} us   "
          f"overhead {layer_us - base_us:6.2f} us   (CPU time per call, median of {ROUNDS} rounds)")
