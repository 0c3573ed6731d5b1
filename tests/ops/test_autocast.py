"""The ops under ``torch.autocast``, as ``nn.Linear`` behaves there: the computation runs in the
autocast dtype, float32 parameters stay float32 and get float32 gradients.

Each backend of ``lora_linear`` and ``bottleneck`` is compared, forward and gradients, with the
reference run on the same inputs cast to the autocast dtype (outside autocast), under bf16 and
fp16. Triton runs on a GPU (marked ``gpu``) or in its interpreter: as in
``test_lora_triton.py``, ``test_triton_in_the_interpreter`` re-runs this file's Triton tests in a
subprocess with ``TRITON_INTERPRET=1`` (tiny shapes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import peftcore
from peftcore.ops import _extension, bottleneck as bn, lora

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton is a Linux test dependency
    HAS_TRITON = False
else:
    HAS_TRITON = True
HAS_CPP = _extension.load()[0]
REPO = Path(__file__).resolve().parents[2]

needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
TRITON_MARKS = [pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")]
if not INTERPRET:
    TRITON_MARKS.append(pytest.mark.gpu)

# (backend, device): every backend of each op, where it runs.
LORA_BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpp", "cpu", marks=needs_cpp, id="cpp"),
    pytest.param("triton", TRITON_DEVICE, marks=TRITON_MARKS, id="triton"),
    pytest.param("cuda", "cuda", marks=[pytest.mark.gpu, needs_cpp], id="cuda"),
    pytest.param("reference", "cuda", marks=pytest.mark.gpu, id="reference-cuda"),
]
BOTTLENECK_BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpp", "cpu", marks=needs_cpp, id="cpp"),
    pytest.param("triton", TRITON_DEVICE, marks=TRITON_MARKS, id="triton"),
    pytest.param("reference", "cuda", marks=pytest.mark.gpu, id="reference-cuda"),
]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]

# Max |got - ref| <= TOL * max(1, max |ref|): both sides round inputs, the rank-sized
# intermediate and outputs to 8 (bf16) or 11 (fp16) significant bits, in different orders.
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``got`` has ``want``'s dtype and shape and is within the tolerance of autocast ``dtype``."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    bound = TOL[dtype] * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _leaves(tensors, device):
    """float32 copies on ``device``; those that are not ``None`` and flagged get requires_grad."""
    return [None if t is None else t.detach().to(device).clone().requires_grad_(grad) for t, grad in tensors]


def _grads(y: torch.Tensor, leaves: list, seed: int = 1) -> tuple[torch.Tensor, list]:
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return g, list(torch.autograd.grad(y, wanted, g))


# -- lora_linear --------------------------------------------------------------------------------
def _lora_inputs():
    gen = torch.Generator().manual_seed(0)
    K, N, r = 24, 20, 4
    x = torch.randn(2, 5, K, generator=gen)
    W = torch.randn(N, K, generator=gen) * K**-0.5
    b = torch.randn(N, generator=gen) * 0.1
    A = torch.randn(r, K, generator=gen) * K**-0.5
    B = torch.randn(N, r, generator=gen) * 0.5
    # x, A and B are trained (a mid-network layer); the base weight and bias are frozen.
    return [(x, True), (W, False), (b, False), (A, True), (B, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("backend, device", LORA_BACKENDS)
def test_lora_linear_follows_autocast(backend, device, dtype, p):
    seed = 0x5EED_1234
    x, W, b, A, B = leaves = _leaves(_lora_inputs(), device)
    with torch.autocast(device, dtype=dtype):
        y = lora.lora_linear(x, W, b, A, B, 0.75, p, seed, backend=backend)
    assert y.dtype == dtype
    grad_y, grads = _grads(y, leaves)
    assert all(t.dtype == torch.float32 for t in leaves), "the parameters stay float32"
    assert [g.dtype for g in grads] == [torch.float32] * 3, "float32 gradients for float32 leaves"

    ref_leaves = _leaves([(t, t.requires_grad) for t in leaves], device)
    xr, Wr, br, Ar, Br = ref_leaves
    y_ref = lora.reference_lora_linear(xr.to(dtype), Wr.to(dtype), br.to(dtype), Ar.to(dtype), Br.to(dtype), 0.75, p, seed)
    grads_ref = torch.autograd.grad(y_ref, [xr, Ar, Br], grad_y)
    _assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dA", "dB"), grads, grads_ref):
        _assert_close(got, want, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@needs_cpp
def test_cpp_op_has_an_autocast_kernel(dtype):
    """``torch.ops.peftcore.lora_linear`` itself follows autocast (its registered autocast kernel),
    whoever calls it: the inference op and the eager training op."""
    x, W, b, A, B = _leaves(_lora_inputs(), "cpu")
    x2, seed = x.reshape(-1, x.shape[-1]), torch.zeros((), dtype=torch.int64)
    with torch.autocast("cpu", dtype=dtype):
        with torch.no_grad():
            y, h = torch.ops.peftcore.lora_linear.default(x2, W, b, A, B, 0.5, 0.0, seed)
        y_train = torch.ops.peftcore.lora_linear_autograd.default(x2, W, b, A, B, 0.5, 0.0, seed)
    assert y.dtype == h.dtype == y_train.dtype == dtype
    y_train.float().sum().backward()
    assert A.grad.dtype == B.grad.dtype == x.grad.dtype == torch.float32


@needs_cpp
@pytest.mark.parametrize("where", ["outside", "inside"])
def test_compiled_op_follows_autocast_without_graph_breaks(where):
    """torch.compile traces the autocast rule, with autocast entered around or inside the compiled code."""
    x, W, b, A, B = _leaves(_lora_inputs(), "cpu")

    def run(x, W, b, A, B):
        return lora.lora_linear(x, W, b, A, B, 0.5, backend="cpp")

    def run_inside(x, W, b, A, B):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run(x, W, b, A, B)

    fn = run if where == "outside" else run_inside
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "outside"):
        eager, got = fn(x, W, b, A, B), compiled(x, W, b, A, B)
    assert got.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(got, eager)
    got.float().sum().backward()
    assert A.grad.dtype == torch.float32


# -- bottleneck ------------------------------------------------------------------------------------
def _bottleneck_inputs(residual: bool):
    gen = torch.Generator().manual_seed(0)
    K, r = 24, 6
    N = 20 if residual else K
    x = torch.randn(2, 5, K, generator=gen)
    W_down, b_down = torch.randn(r, K, generator=gen) * K**-0.5, torch.randn(r, generator=gen) * 0.1
    W_up, b_up = torch.randn(N, r, generator=gen) * r**-0.5, torch.randn(N, generator=gen) * 0.1
    res = torch.randn(2, 5, N, generator=gen) if residual else None
    return [(x, True), (W_down, True), (b_down, True), (W_up, True), (b_up, True), (res, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["x", "residual"])
@pytest.mark.parametrize("backend, device", BOTTLENECK_BACKENDS)
def test_bottleneck_follows_autocast(backend, device, dtype, residual):
    leaves = _leaves(_bottleneck_inputs(residual), device)
    with torch.autocast(device, dtype=dtype):
        y = bn.bottleneck(*leaves[:5], 0.5, "gelu", leaves[5], backend=backend)
    assert y.dtype == dtype
    grad_y, grads = _grads(y, leaves)
    assert all(t.dtype == torch.float32 for t in leaves if t is not None)
    assert all(g.dtype == torch.float32 for g in grads)

    ref_leaves = _leaves([(t, t is not None and t.requires_grad) for t in leaves], device)
    cast = [None if t is None else t.to(dtype) for t in ref_leaves]
    y_ref = bn.reference_bottleneck(*cast[:5], 0.5, "gelu", cast[5])
    grads_ref = torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], grad_y)
    _assert_close(y, y_ref, dtype, "y")
    names = ("dx", "dW_down", "db_down", "dW_up", "db_up", "dresidual")
    for name, got, want in zip(names, grads, grads_ref):
        _assert_close(got, want, dtype, name)


@needs_cpp
def test_cpp_bottleneck_op_has_an_autocast_kernel():
    x, W_down, b_down, W_up, b_up, _ = _leaves(_bottleneck_inputs(False), "cpu")
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            y, h = torch.ops.peftcore.bottleneck.default(x2, W_down, b_down, W_up, b_up, 0.5, "gelu", None)
        y_train = torch.ops.peftcore.bottleneck_autograd.default(x2, W_down, b_down, W_up, b_up, 0.5, "gelu", None)
    assert y.dtype == h.dtype == y_train.dtype == torch.bfloat16
    y_train.float().sum().backward()
    assert W_down.grad.dtype == W_up.grad.dtype == x.grad.dtype == torch.float32


# -- wrapped models --------------------------------------------------------------------------------
def _tiny_model(method: str, **options) -> nn.Module:
    torch.manual_seed(0)
    # The first layer is left plain: under autocast it hands bf16/fp16 to the adapted ones, which
    # then meet a low-precision input and float32 weights, biases and adapter parameters.
    model = nn.Sequential(nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8))
    peftcore.wrap(model, method, targets=["2", "4"], **options)
    with torch.no_grad():  # non-zero adapters, so the adapter path counts
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model.train()


def _train_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype):
    torch.manual_seed(5)  # the dropout seeds
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        loss = out.float().pow(2).mean()
    loss.backward()
    return out, loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method, options", [
    ("lora", {"rank": 4, "dropout": 0.1}),
    ("adapter", {"size": 6}),
], ids=["lora", "adapter"])
def test_wrapped_model_trains_under_autocast(method, options, dtype):
    """Forward and backward of a wrapped model on the default backend (``auto``: cpp where built),
    against the same model on the reference backend."""
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    runs = {}
    for backend in ("auto", "reference"):
        model = _tiny_model(method, backend=backend, **options)
        runs[backend] = _train_step(model, x, dtype)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
    (out, loss, grads), (out_ref, loss_ref, grads_ref) = runs["auto"], runs["reference"]
    assert out.dtype == dtype and torch.isfinite(loss)
    _assert_close(out, out_ref, dtype, "output")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name].dtype == torch.float32, name
        _assert_close(grads[name], grads_ref[name], dtype, name)


@needs_cpp
def test_wrapped_model_under_autocast_compiles_without_graph_breaks():
    model = _tiny_model("lora", rank=4, dropout=0.1, backend="cpp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(torch.randn(5, 24))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


# -- Triton in the interpreter --------------------------------------------------------------------
@pytest.mark.skipif(INTERPRET, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.triton
def test_triton_in_the_interpreter(request):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x", "-k", "triton and not interpreter"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"interpreter run failed:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
