"""The Triton LoRA kernels against the reference: forward, every gradient, the dropout mask.

Kernel tests run where the kernels can: on a GPU (marked ``gpu``), or on the CPU in Triton's
interpreter. Triton fixes interpreter mode when it is imported, so a CPU run cannot switch it on
inside this process (other tests may have imported triton already) without leaking it into
them: ``test_kernels_in_the_interpreter`` re-runs this file in a subprocess with
``TRITON_INTERPRET=1``, where the kernel tests run on CPU tensors and fail the parent if any fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftcore
from peftcore.errors import BackendUnavailableError, ConfigError
from peftcore.ops import dispatch, lora, philox

pytestmark = pytest.mark.triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
HAS_TRITON = True
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux test dependency
    HAS_TRITON = False

if HAS_TRITON:
    from peftcore.ops import lora_triton as lt

DEVICE = "cpu" if INTERPRET else "cuda"
REPO = Path(__file__).resolve().parents[2]


def on_device(fn):
    """Kernel tests: on the CPU in the interpreter; otherwise on a GPU (``gpu``: skipped without one)."""
    fn = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")(fn)
    return fn if INTERPRET else pytest.mark.gpu(fn)


# Max |got - ref| <= TOL * max(1, max |ref|) against a float64 reference on the same inputs.
# fp32: accumulation order only. bf16 / fp16: inputs are exact, outputs and the rank-sized
# intermediates (hs, dh) are rounded once to 8 / 11 significant bits.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (leading dims of x, K, N, rank, bias): odd sizes that leave every tile partly masked, K both
# a multiple of 4 (the mask's one-draw-per-four-columns path) and not, ranks 1..16 and past the
# 16-wide rank chunk of the interpreter (several chunks).
SHAPES = [
    ((3, 37), 29, 17, 1, True),
    ((3, 37), 29, 17, 4, False),
    ((3, 37), 29, 17, 16, True),
    ((111,), 32, 20, 8, True),
    ((5,), 64, 70, 33, False),
    ((1,), 16, 16, 2, True),
]


def _inputs(lead, K, N, rank, bias, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    x = rand(*lead, K)
    W = rand(N, K, scale=K**-0.5)
    b = rand(N) if bias else None
    A = rand(rank, K, scale=K**-0.5)
    B = rand(N, rank)
    return x, W, b, A, B


def _run(fn, x, W, b, A, B, scale, p, seed, grad_out, *, train_w=False):
    """Output and gradients (x, bias, A, B[, W]) of ``fn`` for upstream gradient ``grad_out``."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, b, A, B)]
    w = W.detach().clone().requires_grad_(train_w)
    xl, bl, Al, Bl = leaves
    y = fn(xl, w, bl, Al, Bl, scale, p, seed)
    y.backward(grad_out)
    grads = [t.grad if t is not None else None for t in leaves] + ([w.grad] if train_w else [])
    return y.detach(), grads


def _reference(x, W, b, A, B, scale, p, seed, grad_out, *, train_w=False):
    up = [t.double() if t is not None else None for t in (x, W, b, A, B)]
    return _run(lora.reference_lora_linear, *up, scale, p, seed, grad_out.double(), train_w=train_w)


def _assert_close(got, ref, dtype, what):
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    tol = TOL[dtype] * max(1.0, ref.abs().max().item())
    err = (got.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


# -- kernel tests ------------------------------------------------------------------------------


def _shape_id(shape):
    lead, K, N, rank, bias = shape
    return "x".join(map(str, (*lead, K, N, rank))) + ("-bias" if bias else "")


# With dropout: every shape in fp32 and bf16, and fp16 (the same kernels, another cast) on two.
# Without (the mask-free branch of each kernel): every shape in fp32, one in bf16. A subset, to
# keep the interpreter run short.
CASES = [(shape, dtype, 0.25) for dtype in (torch.float32, torch.bfloat16) for shape in SHAPES]
CASES += [(SHAPES[0], torch.float16, 0.25), (SHAPES[4], torch.float16, 0.25)]
CASES += [(shape, torch.float32, 0.0) for shape in SHAPES] + [(SHAPES[2], torch.bfloat16, 0.0)]


@on_device
@pytest.mark.parametrize("shape, dtype, p", CASES, ids=[f"{_shape_id(s)}-{str(d)[6:]}-p{p}" for s, d, p in CASES])
def test_forward_and_gradients_match_reference(shape, dtype, p):
    lead, K, N, rank, bias = shape
    x, W, b, A, B = _inputs(lead, K, N, rank, bias, dtype)
    grad_out = torch.randn(*lead, N, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    seed = 0x5EED_0000_1234
    y, grads = _run(lt.TRITON, x, W, b, A, B, 0.75, p, seed, grad_out)
    y_ref, grads_ref = _reference(x, W, b, A, B, 0.75, p, seed, grad_out)
    _assert_close(y, y_ref, dtype, "y")
    for name, got, ref in zip(("dx", "dbias", "dA", "dB"), grads, grads_ref):
        if ref is None:
            assert got is None, name
            continue
        _assert_close(got, ref, dtype, name)


@on_device
@pytest.mark.parametrize("k", [29, 36, 64], ids=["K29", "K36", "K64"])
@pytest.mark.parametrize("seed", [1, 0xFFFF_FFFF, 2**64 - 3], ids=["one", "u32max", "top-bit"])
def test_in_kernel_mask_is_the_philox_mask(k, seed):
    # Rows from 2**28 on: offsets past 2**32 exercise the counter's high word.
    p, rows, row0 = 0.3, 32, 2**28
    out = torch.zeros(rows, k, dtype=torch.int8, device=DEVICE)
    args = lt._dropout_args(p, seed, k)
    _mask_probe[(1,)](out, args["seed"], row0, k, args["threshold"], BLOCK_M=rows, BLOCK_K=32, K_ALIGNED=args["K_ALIGNED"])
    expected = philox.keep_mask(seed, (rows, k), p, start=row0 * k)
    assert torch.equal(out.cpu().bool(), expected)


if HAS_TRITON:

    @triton.jit
    def _mask_probe(out_ptr, seed, row0, K, threshold,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_ALIGNED: tl.constexpr):
        """Writes lt._keep_mask for rows row0 .. row0 + BLOCK_M - 1 of a (*, K) input."""
        rows = tl.arange(0, BLOCK_M)
        for k_start in range(0, K, BLOCK_K):
            keep = lt._keep_mask(seed, row0 + rows, k_start, K, threshold, BLOCK_M, BLOCK_K, K_ALIGNED)
            cols = k_start + tl.arange(0, BLOCK_K)
            tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=cols[None, :] < K)


@on_device
def test_dropout_changes_with_the_seed_and_drops_about_p():
    x, W, b, A, B = _inputs((64,), 32, 8, 4, False, torch.float32)
    W.zero_()  # y is the low-rank path alone
    y0 = lt.TRITON(x, W, None, A, B, 1.0, 0.0, 0)
    y1 = lt.TRITON(x, W, None, A, B, 1.0, 0.5, 11)
    assert not torch.allclose(y0, y1)
    assert torch.equal(y1, lt.TRITON(x, W, None, A, B, 1.0, 0.5, 11))
    assert not torch.allclose(y1, lt.TRITON(x, W, None, A, B, 1.0, 0.5, 12))
    # hs = scale * dropout(x) A^T with A = I picks out dropout(x) itself.
    eye = torch.eye(32, device=DEVICE)
    _, hs = lt.lora_forward(x, W.new_zeros(8, 32), None, eye, W.new_zeros(8, 32), 1.0, 0.5, 11)
    dropped = (hs == 0).float().mean().item()
    assert 0.4 < dropped < 0.6


@on_device
def test_strided_inputs_and_expanded_gradient():
    # GPT-2's Conv1D passes weight.t() of a (K, N) tensor; x a column slice; y.sum() gives a
    # stride-0 gradient. None of them may be copied or misread.
    K, N, rank = 24, 18, 5
    x_full = torch.randn(3, 7, 2 * K, device=DEVICE)
    x = x_full[..., ::2]
    W = (torch.randn(K, N, device=DEVICE) * K**-0.5).t()
    A, B = torch.randn(rank, K, device=DEVICE) * K**-0.5, torch.randn(N, rank, device=DEVICE)
    b = torch.randn(N, device=DEVICE)
    grad_out = torch.ones(3, 7, N, device=DEVICE).expand(3, 7, N)
    y, grads = _run(lt.TRITON, x, W, b, A, B, 2.0, 0.1, 99, grad_out, train_w=True)
    y_ref, grads_ref = _reference(x, W, b, A, B, 2.0, 0.1, 99, grad_out, train_w=True)
    _assert_close(y, y_ref, torch.float32, "y")
    for name, got, ref in zip(("dx", "dbias", "dA", "dB", "dW"), grads, grads_ref):
        _assert_close(got, ref, torch.float32, name)


@on_device
def test_saves_only_x_and_rank_sized_tensors():
    M, K, N, rank = 40, 32, 48, 4
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    layers = [(torch.randn(N, K, device=DEVICE), torch.randn(rank, K, device=DEVICE, requires_grad=True),
               torch.randn(N, rank, device=DEVICE, requires_grad=True)) for _ in range(3)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = [lt.TRITON(x, W, None, A, B, 1.0, 0.1, i) for i, (W, A, B) in enumerate(layers)]  # q, k, v
    params = {t.data_ptr() for layer in layers for t in layer}
    big = [t for t in saved if t.numel() > M * rank and t.data_ptr() not in params]
    assert {t.data_ptr() for t in big} == {x.data_ptr()}, "only x itself may be input-sized"
    assert sum(t.numel() for t in saved if t.data_ptr() not in params | {x.data_ptr()}) == 3 * M * rank
    sum(y.sum() for y in ys).backward()
    assert x.grad is not None


@on_device
def test_frozen_inputs_get_no_gradient():
    x, W, b, A, B = _inputs((9,), 20, 12, 3, True, torch.float32)
    A.requires_grad_(True)
    y = lt.TRITON(x, W, b, A, B, 1.0, 0.2, 5)  # x, W, b, B frozen
    y.sum().backward()
    assert A.grad is not None and x.grad is None and W.grad is None and b.grad is None and B.grad is None


@on_device
def test_empty_batch():
    x, W, b, A, B = _inputs((0,), 16, 8, 2, True, torch.float32)
    x.requires_grad_(True)
    A.requires_grad_(True)
    y = lt.TRITON(x, W, b, A, B, 1.0, 0.1, 3)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A))


@pytest.mark.slow
@on_device
def test_dispatch_by_name_in_a_wrapped_gpt2():
    from models import gpt2, token_inputs

    def trained(backend):
        torch.manual_seed(0)
        model = gpt2().to(DEVICE)
        peftcore.wrap(model, "lora", rank=4, dropout=0.1, backend=backend)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:  # B starts at zero; make the low-rank path matter
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
        model.train()
        inputs = {k: v.to(DEVICE) for k, v in token_inputs().items()}
        torch.manual_seed(123)  # the layers draw their dropout seeds from torch's generator
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return out.loss.detach(), grads

    loss, grads = trained("triton")
    loss_ref, grads_ref = trained("reference")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not INTERPRET, reason="about interpreter mode")
def test_auto_does_not_pick_the_interpreter_on_cpu():
    assert "cpu" in lt.TRITON.devices and lt.TRITON.priority < lora.REFERENCE.priority
    assert dispatch.select("lora_linear", "cpu", "auto").backend != "triton"
    assert dispatch.select("lora_linear", "cpu", "triton") is lt.TRITON


# -- this process: availability, errors, and the interpreter run -----------------------------


@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="runs in the parent process, with triton installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given without a CUDA device")
def test_unavailable_without_a_gpu_says_why():
    ok, reason = lt.TRITON.available()
    assert not ok and "no CUDA device" in reason and "TRITON_INTERPRET" in reason
    status = {(s.op, s.backend): s for s in peftcore.backends()}
    assert not status["lora_linear", "triton"].available
    assert status["lora_linear", "triton"].reason == reason
    with pytest.raises(BackendUnavailableError, match="runs on cuda, not on cpu"):
        dispatch.select("lora_linear", "cpu", "triton")
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        dispatch.select("lora_linear", "cuda", "triton")


def test_reports_a_missing_triton_package(monkeypatch):
    if not HAS_TRITON:
        ok, reason = __import__("peftcore.ops.lora_triton", fromlist=["TRITON"]).TRITON.available()
    else:
        monkeypatch.setattr(lt, "triton", None)
        monkeypatch.setattr(lt, "_TRITON_MISSING", "the triton package is not importable (ImportError: test)")
        ok, reason = lt.TRITON.available()
    assert not ok and "triton package is not importable" in reason


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_bad_inputs_raise_before_any_launch():
    x, W, b, A, B = _inputs((4,), 8, 6, 2, True, torch.float32, device="cpu")
    with pytest.raises(ConfigError, match="A has shape"):
        lt.lora_forward(x, W, b, A[:, :5], B, 1.0, 0.0, 0)
    with pytest.raises(ConfigError, match="bias has shape"):
        lt.lora_forward(x, W, b[:3], A, B, 1.0, 0.0, 0)
    with pytest.raises(ConfigError, match="B is torch.float64 but x is torch.float32"):
        lt.lora_forward(x, W, b, A, B.double(), 1.0, 0.0, 0)
    with pytest.raises(ConfigError, match="dtype torch.int64 is not supported"):
        lt.lora_forward(x.long(), W.long(), None, A.long(), B.long(), 1.0, 0.0, 0)
    with pytest.raises(ConfigError, match="dropout_p must be in"):
        lt.lora_forward(x, W, b, A, B, 1.0, 1.0, 0)
    if not INTERPRET:
        with pytest.raises(BackendUnavailableError, match="runs on CUDA tensors"):
            lt.lora_forward(x, W, b, A, B, 1.0, 0.0, 0)


@pytest.mark.skipif(INTERPRET, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_in_the_interpreter(request):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x"]
    if request.config.getoption("markexpr"):  # e.g. -m "not slow" reaches the child too
        cmd += ["-m", request.config.getoption("markexpr")]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"interpreter run failed:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
