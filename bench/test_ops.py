"""lora_linear per op: forward, backward and forward+backward on every backend available for
the CPU here, against the reference and against the plain base linear layer (``linear``: what
the frozen layer alone costs). fp32, rank 8, dropout 0.1, x requires grad (a mid-network layer).
Each fused backend's forward+backward is also measured alternating call by call with ``linear``
(``test_lora_linear_interleaved``): the summary's paired ratios.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interleave import interleaved
from peftcore.ops import dispatch, lora

SHAPES = {  # name: (M, K, N)
    "2048x384->384 (MiniLM q/k/v)": (2048, 384, 384),
    "2048x384->1536 (MiniLM up)": (2048, 384, 1536),
    "2048x1536->384 (MiniLM down)": (2048, 1536, 384),
    "111x129->65 (odd)": (111, 129, 65),
}
RANK, DROPOUT = 8, 0.1
BACKENDS = ["linear"] + [s.backend for s in dispatch.backends("lora_linear") if "cpu" in s.devices and s.available]


def _inputs(M, K, N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).requires_grad_()
    W, b = torch.randn(N, K, generator=g) * K**-0.5, torch.randn(N, generator=g)
    A = (torch.randn(RANK, K, generator=g) * K**-0.5).requires_grad_()
    B = (torch.randn(N, RANK, generator=g) * 0.1).requires_grad_()
    return x, W, b, A, B, torch.randn(M, N, generator=g)


def _forward(backend, x, W, b, A, B):
    if backend == "linear":
        return F.linear(x, W, b)
    return lora.lora_linear(x, W, b, A, B, 2.0, DROPOUT, lora.new_seed_tensor(), backend=backend)


@pytest.mark.parametrize("which", ["forward", "backward", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lora_linear(benchmark, results, shape, backend, which):
    M, K, N = SHAPES[shape]
    if backend == "reference" and M * K > 2048 * 384:
        pytest.skip("the reference backend's Philox in plain PyTorch takes seconds at this shape")
    x, W, b, A, B, grad = _inputs(M, K, N)
    benchmark.group = f"lora_linear {shape} {which}"
    rounds = 20 if M * max(K, N) > 100_000 else 100
    if which == "forward":
        benchmark.pedantic(_forward, args=(backend, x, W, b, A, B), rounds=rounds, warmup_rounds=2)
    elif which == "backward":
        def setup():
            return (_forward(backend, x, W, b, A, B),), {}

        benchmark.pedantic(lambda y: y.backward(grad), setup=setup, rounds=rounds, warmup_rounds=2)
    else:
        benchmark.pedantic(lambda: _forward(backend, x, W, b, A, B).backward(grad), rounds=rounds, warmup_rounds=2)
    results.ops.append((shape, backend, which, benchmark.stats.stats.median, benchmark.stats.stats.min))


FUSED = [backend for backend in BACKENDS if backend not in ("linear", "reference")]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lora_linear_interleaved(benchmark, results, shape, backend):
    """Forward + backward of the fused op and of the base layer alone, alternating call by call:
    the op's cost over the base layer as a paired ratio (``summary.paired_ratio``), steadier on a
    loaded machine than two separate tests' medians."""
    M, K, N = SHAPES[shape]
    x, W, b, A, B, grad = _inputs(M, K, N)
    calls = {name: (lambda name=name: _forward(name, x, W, b, A, B).backward(grad)) for name in ("linear", backend)}
    benchmark.group = f"lora_linear {shape} fwd+bwd, interleaved"
    rounds = interleaved(benchmark, calls, 60 if M * max(K, N) > 100_000 else 200)
    results.ops_interleaved.append((shape, backend, rounds["linear"], rounds[backend]))
