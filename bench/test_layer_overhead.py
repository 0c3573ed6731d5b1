"""Per-forward overhead of an adapter layer on a small layer, where fixed per-call costs (backend
dispatch, Python around the op) show rather than the matmuls.

A 32 x 64 -> 64 ``nn.Linear`` (fp32, ``no_grad``) alone, wrapped with LoRA (rank 8, ``auto``
backend: ``cpp`` where the extension is built) and wrapped with a sequential bottleneck adapter
(size 8, GELU), each measured alternating call by call with the plain layer (see
``bench/interleave.py``); the summary is the median forward of each and its cost over the plain
layer. Run (about half a minute)::

    python -m pytest bench/test_layer_overhead.py --benchmark-only -q -s
"""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

import peftcore
from interleave import interleaved

M, K, N = 32, 64, 64
ROUNDS = 3000


def _layer(method: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N))
    if method == "lora":
        peftcore.wrap(model, "lora", rank=8)
    elif method == "adapter":
        peftcore.wrap(model, "adapter", targets=["0"], size=8, activation="gelu")
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_layer_forward_overhead(benchmark, method):
    plain, wrapped = _layer(None), _layer(method)
    x = torch.randn(M, K)

    def forward(model):
        with torch.no_grad():
            model(x)

    calls = {"linear": lambda: forward(plain), method: lambda: forward(wrapped)}
    benchmark.group = f"{method} layer forward {M}x{K}->{N}, no_grad, interleaved"
    times = interleaved(benchmark, calls, ROUNDS)
    base_us, layer_us = statistics.median(times["linear"]) * 1e6, statistics.median(times[method]) * 1e6
    print(f"\n{method:<8} forward median {layer_us:7.2f} us   nn.Linear alone {base_us:6.2f} us   "
          f"overhead {layer_us - base_us:6.2f} us")
