"""The Triton grouped LoRA kernels (``lora_grouped`` backend ``triton``) against the reference:
forward and every gradient, ranks that differ, empty groups, base rows, dropout per adapter.

They run where they can: on a GPU (marked ``gpu``), or on the CPU in Triton's interpreter, which
must be switched on before triton is imported: ``test_kernels_in_the_interpreter`` re-runs this
file in a subprocess with ``TRITON_INTERPRET=1`` (tiny shapes: the interpreter is slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftcore.ops import lora_grouped

pytestmark = pytest.mark.triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux test dependency
    HAS_TRITON = False

DEVICE = "cpu" if INTERPRET else "cuda"
REPO = Path(__file__).resolve().parents[2]
runs_kernels = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or torch.cuda.is_available()),
    reason="needs triton and a CUDA device, or TRITON_INTERPRET=1 (see test_kernels_in_the_interpreter)",
)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _inputs(M, K, N, ranks, dtype, index):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(DEVICE)

    x = rand(M, K).requires_grad_()
    W = rand(N, K, std=K**-0.5)
    b = rand(N).requires_grad_()
    A = [rand(r, K, std=K**-0.5).requires_grad_() for r in ranks]
    B = [rand(N, r, std=r**-0.5).requires_grad_() for r in ranks]
    return x, W, b, A, B, torch.tensor(index, device=DEVICE)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if INTERPRET else [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_triton_matches_reference(dtype, dropout):
    from peftcore.ops.lora_grouped_triton import triton_lora_grouped

    # 19 rows, K=24 (Philox blocks aligned) and N=20, ranks 3, 1 and 5; adapter 3 has no row.
    index = [0, 1, -1, 2, 0, 0, 1, -1, 2, 2, 0, 1, 0, 2, -1, 0, 1, 2, 0]
    x, W, b, A, B, idx = _inputs(19, 24, 20, [3, 1, 5, 2], dtype, index)
    scales, ps, seed = [0.5, 2.0, 1.25, 1.0], [dropout, 0.0, dropout / 2, dropout], 1234
    grad = torch.randn(19, 20, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    leaves = [x, b, *A, *B]
    y = triton_lora_grouped(x, W, b, A, B, scales, idx, ps, seed)
    got = (y, *torch.autograd.grad(y, leaves, grad))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = lora_grouped.reference_lora_grouped(leaves64[0], W.double(), leaves64[1], leaves64[2:6], leaves64[6:],
                                              scales, idx, ps, seed)
    want = (y64, *torch.autograd.grad(y64, leaves64, grad.double()))
    for i, (g_, w_) in enumerate(zip(got, want)):
        scale = w_.abs().max().clamp_min(1e-6)
        if w_.abs().max() == 0:
            assert g_.abs().max() == 0, i
        else:
            assert ((g_.double() - w_).abs().max() / scale).item() <= TOLERANCE[dtype], i


@pytest.mark.slow  # about 10 s: a subprocess and Triton's interpreter
@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="the parent run starts the interpreter run")
def test_kernels_in_the_interpreter(request):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"interpreter run failed:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
