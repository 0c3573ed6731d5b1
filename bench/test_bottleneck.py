"""bottleneck per op: forward, backward and forward+backward on every backend available for the
CPU here, against the reference. fp32, MiniLM widths (hidden 384, bottleneck 64), GELU, x
requires grad (a mid-network adapter).
"""

from __future__ import annotations

import pytest
import torch

from peftcore.ops import bottleneck, dispatch

SHAPES = {  # name: (M, K, r)
    "2048x384, size 64 (MiniLM)": (2048, 384, 64),
    "111x129, size 17 (odd)": (111, 129, 17),
}
BACKENDS = [s.backend for s in dispatch.backends("bottleneck") if "cpu" in s.devices and s.available]


def _inputs(M, K, r):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).requires_grad_()
    W_down = (torch.randn(r, K, generator=g) * K**-0.5).requires_grad_()
    b_down = torch.zeros(r).requires_grad_()
    W_up = (torch.randn(K, r, generator=g) * r**-0.5).requires_grad_()
    b_up = torch.zeros(K).requires_grad_()
    return x, W_down, b_down, W_up, b_up, torch.randn(M, K, generator=g)


def _forward(backend, x, W_down, b_down, W_up, b_up):
    return bottleneck.bottleneck(x, W_down, b_down, W_up, b_up, 1.0, "gelu", backend=backend)


@pytest.mark.parametrize("which", ["forward", "backward", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bottleneck(benchmark, results, shape, backend, which):
    *tensors, grad = _inputs(*SHAPES[shape])
    benchmark.group = f"bottleneck {shape} {which}"
    if which == "forward":
        benchmark.pedantic(_forward, args=(backend, *tensors), rounds=50, warmup_rounds=3)
    elif which == "backward":
        def setup():
            return (_forward(backend, *tensors),), {}

        benchmark.pedantic(lambda y: y.backward(grad), setup=setup, rounds=50, warmup_rounds=3)
    else:
        benchmark.pedantic(lambda: _forward(backend, *tensors).backward(grad), rounds=50, warmup_rounds=3)
    results.bottleneck_ops.append((shape, backend, which, benchmark.stats.stats.median, benchmark.stats.stats.min))
