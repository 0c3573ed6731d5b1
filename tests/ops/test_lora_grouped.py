"""The grouped LoRA op: the reference's meaning (one lora_linear per row), and the C++ op (backend
``cpp``) against the reference: forward and every gradient over dtypes, odd shapes, ranks that
differ, empty groups, base rows, dropout per adapter; gradcheck; opcheck; bad input."""

from __future__ import annotations

import pytest
import torch

from peftcore.ops import _extension, lora, lora_grouped

LOADED, WHY_NOT = _extension.load()
HAS_CPP = LOADED and _extension.torch_has_op("lora_grouped")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension without lora_grouped: {WHY_NOT or 'old build'}")

# Max error relative to the largest reference magnitude, per dtype (as tests/ops/test_lora_cpp.py).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-12}

CASES = [  # (M, K, N, ranks)
    (37, 129, 65, [1, 5, 8, 16]),
    (1, 1, 1, [1]),
    (5, 8, 3, [9, 2]),  # r > K
    (42, 123, 31, [4, 4, 4, 4, 4, 4, 4, 4]),
    (6, 33, 40, [12]),
    (3, 7, 5, []),  # no adapter at all: every row is a base row
    (21, 70, 23, [24, 17, 32, 2]),  # the float32 forward's three- and four-register ranks
    (9, 40, 10, [40, 3]),  # a rank over 32: the float32 forward's general path
]


def _inputs(M, K, N, ranks, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    x = rand(M, K).requires_grad_()
    W = rand(N, K, std=K**-0.5)
    b = rand(N).requires_grad_() if bias else None
    A = [rand(r, K, std=K**-0.5).requires_grad_() for r in ranks]
    B = [rand(N, r, std=r**-0.5).requires_grad_() for r in ranks]
    # Rows -1 .. G-1; the last adapter gets no row at all (an empty group) when there are several.
    top = max(len(ranks) - 1, 0) if len(ranks) > 1 else len(ranks)
    index = torch.randint(-1, top, (M,), generator=g)
    scales = [0.5 + g_ for g_ in range(len(ranks))]
    return x, W, b, A, B, scales, index


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-6)).item()


def _run(fn, x, W, b, A, B, scales, index, ps, seed, grad):
    y = fn(x, W, b, A, B, scales, index, ps, seed)
    leaves = [t for t in (x, b, *A, *B) if t is not None]
    return (y, *torch.autograd.grad(y, leaves, grad, allow_unused=True))


def test_reference_is_lora_linear_per_row():
    """Each row gets exactly lora_linear with its own adapter (mask included), base rows F.linear."""
    x, W, b, A, B, scales, index = _inputs(11, 17, 9, [3, 6], torch.float64)
    index = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1, 0, 1])
    seed, ps = 99, [0.25, 0.5]
    y = lora_grouped.reference_lora_grouped(x, W, b, A, B, scales, index, ps, seed)
    for g in (0, 1):
        want = lora.reference_lora_linear(x, W, b, A[g], B[g], scales[g], ps[g], seed)
        rows = index == g
        torch.testing.assert_close(y[rows], want[rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(y[index == -1], torch.nn.functional.linear(x, W, b)[index == -1], rtol=0, atol=1e-12)


def test_reference_gradients_come_from_own_rows():
    x, W, b, A, B, scales, _ = _inputs(8, 6, 4, [2, 2, 3], torch.float64)
    index = torch.tensor([0, 0, 1, 1, 0, -1, 1, 0])  # adapter 2 has no row
    y = lora_grouped.reference_lora_grouped(x, W, b, A, B, scales, index)
    y[index == 1].sum().backward()
    assert A[0].grad.abs().max() == 0 and B[0].grad.abs().max() == 0
    assert A[1].grad.abs().max() > 0
    assert A[2].grad.abs().max() == 0  # an empty group: zero gradient, not an error


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("M,K,N,ranks", CASES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cpp_matches_reference(dtype, M, K, N, ranks, dropout):
    from peftcore.ops.lora_grouped_cpp import cpp_lora_grouped

    x, W, b, A, B, scales, index = _inputs(M, K, N, ranks, dtype)
    ps = [dropout * (g % 2) for g in range(len(ranks))]  # adapters with and without dropout together
    seed = torch.tensor(1234)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _run(cpp_lora_grouped, x, W, b, A, B, scales, index, ps, seed, grad)
    # The reference in float64 from the same (rounded) inputs: the tolerance then measures the
    # kernel's rounding, not the reference's.
    leaves64 = [t.detach().double().requires_grad_() for t in (x, b, *A, *B)]
    x64, b64, rest = leaves64[0], leaves64[1], leaves64[2:]
    want = _run(
        lora_grouped.reference_lora_grouped, x64, W.double(), b64, rest[: len(ranks)], rest[len(ranks):],
        scales, index, ps, seed, grad.double(),
    )
    for i, (g_, w_) in enumerate(zip(got, want)):
        assert g_.dtype == dtype
        if w_.abs().max() == 0:
            assert g_.abs().max() == 0, f"output {i}"
        else:
            assert _rel_err(g_, w_) <= TOLERANCE[dtype], f"output {i}: {_rel_err(g_, w_)}"


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_runs_of_rows_match_reference(dtype, bias):
    """Rows in runs of one adapter (an example's tokens) take the GEMM-per-run forward."""
    from peftcore.ops.lora_grouped_cpp import cpp_lora_grouped

    x, W, b, A, B, scales, _ = _inputs(60, 33, 17, [3, 8, 1], dtype, bias=bias)
    index = torch.tensor([0, 2, -1, 1, 0, 1]).repeat_interleave(10)  # runs of 10 rows
    with torch.no_grad():
        got = cpp_lora_grouped(x, W, b, A, B, scales, index, [0.0] * 3, 0)
    x64, b64 = x.detach().double(), None if b is None else b.detach().double()
    want = lora_grouped.reference_lora_grouped(x64, W.double(), b64, [a.detach().double() for a in A],
                                               [t.detach().double() for t in B], scales, index)
    assert _rel_err(got, want) <= TOLERANCE[dtype]
    y = cpp_lora_grouped(x, W, b, A, B, scales, index, [0.0] * 3, 0)  # and with autograd
    y.sum().backward()
    assert A[1].grad is not None and A[1].grad.abs().max() > 0


@needs_cpp
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_cpp_forward_does_not_depend_on_thread_count(dropout):
    """Each row's arithmetic is fixed (tiles of rows share loads, not sums): one thread and two
    give the same bits, runs of rows or interleaved."""
    from peftcore.ops.lora_grouped_cpp import cpp_lora_grouped

    x, W, b, A, B, scales, _ = _inputs(301, 96, 70, [8, 16, 3], torch.float32)
    runs = torch.tensor([0, 1, 2, -1, 0, 2, 1]).repeat_interleave(43)
    interleaved = torch.randint(-1, 3, (301,), generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        for index in (runs, interleaved):
            outputs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with torch.no_grad():
                    outputs.append(cpp_lora_grouped(x, W, b, A, B, scales, index, [dropout] * 3, torch.tensor(9)))
            assert torch.equal(outputs[0], outputs[1])
    finally:
        torch.set_num_threads(before)


@needs_cpp
def test_cpp_gradcheck_with_dropout():
    from peftcore.ops.lora_grouped_cpp import cpp_lora_grouped

    x, W, b, A, B, scales, _ = _inputs(7, 6, 5, [2, 3, 1], torch.float64)
    index = torch.tensor([0, 1, -1, 1, 0, 1, 0])  # adapter 2: an empty group

    def f(x, b, A0, A1, A2, B0, B1, B2):
        return cpp_lora_grouped(x, W, b, [A0, A1, A2], [B0, B1, B2], scales, index, [0.3, 0.0, 0.1], torch.tensor(7))

    assert torch.autograd.gradcheck(f, (x, b, *A, *B))


@needs_cpp
def test_opcheck():
    x, W, b, A, B, scales, index = _inputs(9, 10, 6, [2, 4], torch.float32)
    args = (x, W, b, A, B, scales, index, [0.2, 0.0], torch.tensor(5))
    torch.library.opcheck(torch.ops.peftcore.lora_grouped.default, args)
    torch.library.opcheck(torch.ops.peftcore.lora_grouped.default, (x, W, None, A, B, scales, index, [0.0, 0.0], torch.tensor(0)))


@needs_cpp
def test_cpp_one_adapter_equals_lora_linear_op():
    """A batch routed to one adapter gets lora_linear's C++ result (same mask)."""
    x, W, b, A, B, scales, _ = _inputs(13, 19, 7, [5], torch.float32)
    index = torch.zeros(13, dtype=torch.int64)
    y = lora_grouped.lora_grouped(x, W, b, A, B, scales, index, 0.4, torch.tensor(3), backend="cpp")
    want = lora.lora_linear(x, W, b, A[0], B[0], scales[0], 0.4, torch.tensor(3), backend="cpp")
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_cpp_transposed_weight_and_leading_dims():
    x, W, b, A, B, scales, index = _inputs(12, 9, 6, [2, 3], torch.float32)
    x3 = x.detach().reshape(3, 4, 9)
    W_t = W.t().contiguous().t()  # GPT-2's Conv1D passes a transposed view
    y = lora_grouped.lora_grouped(x3, W_t, b, A, B, scales, index, 0.0, 0, backend="cpp")
    want = lora_grouped.reference_lora_grouped(x.detach(), W, b, A, B, scales, index)
    assert y.shape == (3, 4, 6)
    torch.testing.assert_close(y.reshape(12, 6), want, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_cpp_refuses_bad_input():
    x, W, b, A, B, scales, index = _inputs(4, 5, 3, [2], torch.float32)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.peftcore.lora_grouped(x, W, b, A, B, scales, torch.tensor([0, 1, 0, 0]), [0.0], torch.tensor(0))
    with pytest.raises(RuntimeError, match="must be"):
        torch.ops.peftcore.lora_grouped(x, W, b, A, [B[0].t()], scales, index, [0.0], torch.tensor(0))
    with pytest.raises(RuntimeError, match="must match"):
        torch.ops.peftcore.lora_grouped(x, W, b, A, B, [1.0, 2.0], index, [0.0], torch.tensor(0))


def test_backends_listed():
    import peftcore

    names = {s.backend for s in peftcore.backends("lora_grouped")}
    assert {"reference", "cpp"} <= names
