"""The C++ ``lora_linear`` op (backend ``cpp``) against the reference: forward, every gradient,
the dropout mask bit for bit, gradcheck, opcheck, odd shapes (hypothesis), and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.ops import _extension, lora, lora_cpp, philox

LOADED, WHY_NOT = _extension.load()
pytestmark = pytest.mark.skipif(not LOADED, reason=f"C++ extension not built: {WHY_NOT}")

# Max error relative to the largest reference magnitude, per dtype. float32: reduction order only
# (MKL blocks vs the fused kernels' vector sums). bfloat16: 8 mantissa bits, and the fused
# kernels round once where the reference rounds after each op.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-12}

SHAPES = [  # (leading dims of x, K, N, r)
    ((3, 37), 129, 65, 1),
    ((3, 37), 129, 65, 5),
    ((3, 37), 129, 65, 8),
    ((3, 37), 129, 65, 16),
    ((1,), 1, 1, 1),
    ((5,), 8, 3, 9),  # r > K
    ((2, 3, 7), 33, 40, 12),
    ((2, 33), 200, 47, 24),  # rank blocks of 8 x 3; row blocks of 32, 32 and 2; 16-lane chunks + tail
]


def _inputs(lead, K, N, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    x = rand(*lead, K).requires_grad_()
    W = rand(N, K, std=K**-0.5)
    b = rand(N).requires_grad_() if bias else None
    A = rand(r, K, std=K**-0.5).requires_grad_()
    B = rand(N, r, std=r**-0.5).requires_grad_()
    return x, W, b, A, B


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-6)).item()


def _run(fn, x, W, b, A, B, scale, p, seed, grad):
    y = fn(x, W, b, A, B, scale, p, seed)
    leaves = [t for t in (x, b, A, B) if t is not None]
    return (y, *torch.autograd.grad(y, leaves, grad))


def _cpp(x, W, b, A, B, scale, p, seed):
    return lora.lora_linear(x, W, b, A, B, scale, p, seed, backend="cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("lead, K, N, r", SHAPES)
def test_forward_and_grads_match_reference(lead, K, N, r, p, dtype):
    x, W, b, A, B = _inputs(lead, K, N, r, dtype)
    seed = torch.tensor(123456789, dtype=torch.int64)
    grad = torch.randn(*lead, N, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = _run(lora.reference_lora_linear, x, W, b, A, B, 1.7, p, seed, grad)
    got = _run(_cpp, x, W, b, A, B, 1.7, p, seed, grad)
    for name, g, w in zip(["y", "grad_x", "grad_bias", "grad_A", "grad_B"], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert _rel_err(g, w) <= TOLERANCE[dtype], f"{name}: relative error {_rel_err(g, w):.2e}"


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_without_bias_and_without_input_grad(p):
    x, W, _, A, B = _inputs((4, 9), 31, 17, 3, torch.float32, bias=False)
    x = x.detach()  # e.g. the first layer after a frozen embedding: no grad_x work
    seed = torch.tensor(7)
    y_ref = lora.reference_lora_linear(x, W, None, A, B, 0.5, p, seed)
    y = lora.lora_linear(x, W, None, A, B, 0.5, p, seed, backend="cpp")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, (A, B), g), torch.autograd.grad(y_ref, (A, B), g),
                               rtol=1e-5, atol=1e-5)


def test_mask_is_bit_identical_to_philox():
    # With A = I and x = 1, h = dropout(1) exposes the mask: kept entries are exactly 1 / (1 - p).
    # Row lengths cover every path of the AVX2 and AVX-512 generators (groups of 32, 16 and 8
    # blocks, scalar tail); the file's rerun with PEFTCORE_CPU_KERNELS=avx2 checks the AVX2 one on
    # CPUs that have AVX-512.
    cases = [((7, 13), 0), ((50, 37), 2**62 - 1), ((3, 4), -5), ((1, 1), 0x123456789ABCDEF), ((9, 301), 99),
             ((4, 100), 7), ((2, 1000), 11)]
    for (M, K), seed in cases:
        x = torch.ones(M, K)
        seed_t = torch.tensor(seed, dtype=torch.int64)
        _, h = torch.ops.peftcore.lora_linear(x, torch.zeros(2, K), None, torch.eye(K), torch.zeros(2, K), 1.0, 0.37, seed_t)
        assert torch.equal(h != 0, philox.keep_mask(seed, (M, K), 0.37))
        assert torch.all((h == 0) | (h == torch.tensor(1 / 0.63)))


def test_backward_regenerates_the_forward_mask():
    # grad_A = gh^T (mask * x) / (1 - p): computed by hand from the philox mask of the same seed.
    x, W, b, A, B = _inputs((6,), 40, 12, 4, torch.float64)
    seed = torch.tensor(2024)
    y = lora.lora_linear(x, W, b, A, B, 2.0, 0.5, seed, backend="cpp")
    g = torch.randn_like(y)
    grad_A, = torch.autograd.grad(y, (A,), g)
    keep = philox.keep_mask(2024, (6, 40), 0.5).double()
    expected = (2.0 * g @ B).T @ (x * keep / 0.5)
    torch.testing.assert_close(grad_A, expected)
    # A different seed gives a different mask.
    y2 = lora.lora_linear(x, W, b, A, B, 2.0, 0.5, torch.tensor(2025), backend="cpp")
    assert not torch.allclose(torch.autograd.grad(y2, (A,), g)[0], expected)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("fn", [lora.reference_lora_linear, _cpp], ids=["reference", "cpp"])
def test_gradcheck_float64(fn, p):
    x, W, b, A, B = _inputs((3, 5), 11, 7, 3, torch.float64)
    seed = torch.tensor(31337)
    assert torch.autograd.gradcheck(lambda x, b, A, B: fn(x, W, b, A, B, 0.8, p, seed), (x, b, A, B))


def test_opcheck():
    x, W, b, A, B = _inputs((9,), 20, 6, 4, torch.float32)
    for bias, p in [(b, 0.0), (b, 0.2), (None, 0.2)]:
        torch.library.opcheck(torch.ops.peftcore.lora_linear.default,
                              (x, W, bias, A, B, 1.5, p, torch.tensor(5)))
    grad_y, h = torch.randn(9, 6), torch.randn(9, 4)
    for mask in ([True, True, True], [False, True, True], [True, False, False]):
        torch.library.opcheck(torch.ops.peftcore.lora_linear_backward.default,
                              (grad_y, x.detach(), W, A.detach(), B.detach(), h, 1.5, 0.2, torch.tensor(5), mask))


def test_transposed_weight_view_is_read_in_place():
    # GPT-2's Conv1D stores (in, out) and passes weight.t(): the op must not need a copy, and
    # the gradient of an unfrozen weight still reaches the (in, out) parameter.
    torch.manual_seed(0)
    stored = torch.randn(24, 10, requires_grad=True)  # (K, N)
    x, A, B = torch.randn(5, 24, requires_grad=True), torch.randn(3, 24), torch.randn(10, 3)
    y = lora.lora_linear(x, stored.t(), None, A, B, 1.0, 0.1, torch.tensor(3), backend="cpp")
    y_ref = lora.reference_lora_linear(x, stored.t(), None, A, B, 1.0, 0.1, torch.tensor(3))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, (x, stored), g), torch.autograd.grad(y_ref, (x, stored), g),
                               rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient():
    x, W, b, A, B = _inputs((4,), 8, 5, 2, torch.float32)
    y = lora.lora_linear(x, W, b, A, B, 1.0, 0.2, torch.tensor(1), backend="cpp")
    y.sum().backward()
    assert W.grad is None and A.grad is not None and B.grad is not None


@pytest.mark.parametrize("needs", ["all", "x_only", "params_only", "weight_unfrozen"])
def test_eager_and_registered_autograd_agree(needs):
    """Eager training runs the C++ autograd Function (lora_linear_autograd); torch.compile traces
    the op's registered Python formula. Both give the same gradients, whatever needs them."""
    x, W, b, A, B = _inputs((3, 7), 24, 10, 4, torch.float64)
    if needs == "x_only":
        for t in (b, A, B):
            t.requires_grad_(False)
    elif needs == "params_only":
        x.requires_grad_(False)
    elif needs == "weight_unfrozen":
        W.requires_grad_(True)
    seed = torch.tensor(77)
    y = lora.lora_linear(x, W, b, A, B, 1.7, 0.3, seed, backend="cpp")
    assert "LoraLinearFunction" in y.grad_fn.next_functions[0][0].name()  # under the reshape to (3, 7, N)
    y_reg, _ = torch.ops.peftcore.lora_linear(x.reshape(-1, 24), W, b, A, B, 1.7, 0.3, seed)
    torch.testing.assert_close(y.reshape(-1, 10), y_reg, rtol=0, atol=0)
    leaves = [t for t in (x, W, b, A, B) if t.requires_grad]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(y_reg, leaves, g.reshape(-1, 10))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    ref = torch.autograd.grad(lora.reference_lora_linear(x, W, b, A, B, 1.7, 0.3, seed), leaves, g)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_second_differentiation_is_refused_clearly():
    x, W, b, A, B = _inputs((4,), 8, 5, 2, torch.float32)
    y = lora.lora_linear(x, W, b, A, B, 1.0, 0.2, torch.tensor(1), backend="cpp")
    grad_x, = torch.autograd.grad(y.sum(), x, create_graph=True)  # a first derivative is fine
    torch.testing.assert_close(grad_x, torch.autograd.grad(y.sum(), x, retain_graph=True)[0])
    with pytest.raises(RuntimeError, match="differentiable once.*backend='reference'"):
        grad_x.sum().backward()


def test_results_do_not_depend_on_thread_count():
    x, W, b, A, B = _inputs((600,), 70, 30, 6, torch.float32)
    seed = torch.tensor(11)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(_run(_cpp, x, W, b, A, B, 1.0, 0.3, seed, torch.ones(600, 30)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs):
        assert torch.equal(one, two)


@settings(max_examples=25, deadline=None)
@given(
    M=st.integers(1, 70),
    K=st.integers(1, 90),
    N=st.integers(1, 40),
    r=st.integers(1, 16),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    bias=st.booleans(),
    seed=st.integers(-(2**63), 2**63 - 1),
)
def test_hypothesis_shapes(M, K, N, r, p, bias, seed):
    x, W, b, A, B = _inputs((M,), K, N, r, torch.float32, bias=bias, seed=M * 1000 + K)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(N))
    want = _run(lora.reference_lora_linear, x, W, b, A, B, 1.3, p, seed_t, grad)
    got = _run(_cpp, x, W, b, A, B, 1.3, p, seed_t, grad)
    for g, w in zip(got, want):
        # fp32 sums of up to 90 terms in a different order: ~1e-5 absolute is rounding, not a bug.
        torch.testing.assert_close(g, w, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(A=torch.randn(2, 5)), "A must be"),
    (lambda a: a.update(B=torch.randn(3, 7)), "B must be"),
    (lambda a: a.update(bias=torch.randn(4)), "bias must be"),
    (lambda a: a.update(A=torch.randn(2, 6, dtype=torch.float64)), "dtype"),
    (lambda a: a.update(dropout_p=1.0), "dropout_p"),
    (lambda a: a.update(seed=torch.tensor([1, 2])), "seed"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    args = dict(x=torch.randn(4, 6), weight=torch.randn(3, 6), bias=None, A=torch.randn(2, 6), B=torch.randn(3, 2),
                scale=1.0, dropout_p=0.1, seed=torch.tensor(1))
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.peftcore.lora_linear(*args.values())


def test_kernel_object_reports_available():
    assert lora_cpp.CPP.available() == (True, "")
    assert lora_cpp.CPP.devices == ("cpu",) and lora_cpp.CPP.priority > lora.REFERENCE.priority


@pytest.mark.parametrize("lead, dtype, merged", [
    ((600,), torch.float32, True),   # many rows: the update is folded into a temporary weight
    ((4, 150), torch.float64, True),
    ((3,), torch.float32, False),    # few rows (decoding): the low-rank path
    ((600,), torch.bfloat16, False),  # bf16 would round a small update away: the low-rank path
])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_without_grad_matches_reference(lead, dtype, merged, bias):
    x, W, b, A, B = _inputs(lead, 48, 40, 4, dtype, bias=bias)
    W_before = W.clone()
    with torch.no_grad():
        assert lora_cpp._merged_is_cheaper(x.reshape(-1, 48), W, A, 0.0) is merged
        got = _cpp(x, W.t().contiguous().t(), b, A, B, 1.5, 0.0, 0)  # a transposed view, as GPT-2's Conv1D
        want = lora.reference_lora_linear(x, W, b, A, B, 1.5)
        assert not lora_cpp._merged_is_cheaper(x.reshape(-1, 48), W, A, 0.1)  # dropout keeps the op
    assert got.shape == want.shape and got.dtype == dtype
    assert _rel_err(got, want) <= TOLERANCE[dtype]
    assert torch.equal(W, W_before)


def _has_avx512f() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True  # unknown: run the avx2 rerun anyway (it is never wrong, only maybe redundant)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["portable", "avx2"])
def test_the_other_loops_pass_these_tests_too(kernels):
    """The loops that other CPUs run pass this file's tests, on any machine.

    ``portable``: the plain loops (CPUs without AVX2+FMA). ``avx2``: the AVX2 loops with their
    own Philox (CPUs without AVX-512F; on those the default run already is this one).
    ``PEFTCORE_CPU_KERNELS`` is read once per process, so the file runs again in a subprocess
    with it set (without the hypothesis test, for time).
    """
    if os.environ.get("PEFTCORE_CPU_KERNELS") in {"portable", "avx2"}:
        pytest.skip("this run is itself a rerun")
    if kernels == "avx2" and not _has_avx512f():
        pytest.skip("no AVX-512F here: the default run of this file already ran the AVX2 loops")
    env = {**os.environ, "PEFTCORE_CPU_KERNELS": kernels}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", __file__, "-k", "not hypothesis", "-x"],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_an_unknown_kernel_choice_is_refused():
    code = (
        "import torch; from peftcore.ops import _extension; _extension.load(); "
        "torch.ops.peftcore.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), "
        "torch.randn(3, 1), 1.0, 0.1, torch.tensor(1))"
    )
    env = {**os.environ, "PEFTCORE_CPU_KERNELS": "avx9"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "PEFTCORE_CPU_KERNELS must be 'auto'" in run.stderr and "got 'avx9'" in run.stderr
