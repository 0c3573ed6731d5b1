"""lora_grouped_add_ (each row's adapter added into a given base output, in place) against its
reference, and against lora_grouped (the fused op) for the same seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcore.ops.lora_grouped import reference_lora_grouped
from peftcore.ops.lora_grouped_add import lora_grouped_add_, reference_lora_grouped_add

# rtol, and atol relative to the largest magnitude of the reference (computed in float64)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SHAPES = [(1, 1, 1, (1,)), (7, 5, 3, (2, 1)), (42, 123, 31, (16, 4, 7))]  # (M, K, N, ranks)


def _tensors(M, K, N, ranks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype)
    x, W = make(M, K), make(N, K)
    A = [make(r, K) for r in ranks]
    B = [make(N, r) for r in ranks]
    index = torch.randint(-1, len(ranks), (M,), generator=g)
    return x, W, A, B, index


def _close(got, want, tol):
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_and_gradients_match_the_reference(shape, dtype, p):
    M, K, N, ranks = shape
    x, W, A, B, index = _tensors(M, K, N, ranks, dtype)
    scales = [0.7, 1.5, 0.25][: len(ranks)]
    ps = [p, 0.0, p / 2][: len(ranks)]
    seed = torch.tensor(1234, dtype=torch.int64)
    leaves = [t.clone().requires_grad_(True) for t in (x, W, *A, *B)]
    ref = [t.double().requires_grad_(True) for t in (x, W, *A, *B)]
    G = len(ranks)

    def run(fn, ts):
        x_, W_, *f = ts
        return fn(F.linear(x_, W_), x_, f[:G], f[G:], scales, index, ps, seed)

    y, y_ref = run(lora_grouped_add_, leaves), run(reference_lora_grouped_add, ref)
    _close(y, y_ref, TOL[dtype])
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad)
    y_ref.backward(grad.double())
    for got, want in zip(leaves, ref):
        _close(got.grad, want.grad, TOL[dtype])


def test_equals_lora_grouped_for_the_same_seed():
    """The add form on F.linear's output is the fused op: same rows, same mask, same result."""
    x, W, A, B, index = _tensors(11, 24, 6, (3, 2), torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    for seed in (0, 7, 2**62, -5):
        got = lora_grouped_add_(F.linear(x, W, bias), x, A, B, [2.0, 0.5], index, [0.5, 0.2], seed)
        torch.testing.assert_close(got, reference_lora_grouped(x, W, bias, A, B, [2.0, 0.5], index, [0.5, 0.2], seed))


def test_gradients_come_from_own_rows_and_base_rows_are_untouched():
    x, W, A, B, _ = _tensors(6, 5, 4, (2, 3), torch.float64)
    index = torch.tensor([1, -1, 1, -1, -1, 1])  # adapter 0 has no row
    A = [a.requires_grad_(True) for a in A]
    B = [b.requires_grad_(True) for b in B]
    y = lora_grouped_add_(F.linear(x, W), x, A, B, [1.0, 1.0], index)
    torch.testing.assert_close(y[index == -1], F.linear(x, W)[index == -1], rtol=0, atol=0)
    y.sum().backward()
    assert not A[0].grad.any() and not B[0].grad.any()
    assert A[1].grad.any() and B[1].grad.any()


def test_adds_in_place_leading_dims_and_an_empty_batch():
    x, W, A, B, index = _tensors(6, 5, 3, (2,), torch.float32)
    y = F.linear(x.view(2, 3, 5), W)  # (2, 3, 3), a fresh tensor
    out = lora_grouped_add_(y, x.view(2, 3, 5), A, B, [1.0], index)
    assert out.data_ptr() == y.data_ptr() and out.shape == (2, 3, 3)
    torch.testing.assert_close(out.view(6, 3), reference_lora_grouped_add(F.linear(x, W), x, A, B, [1.0], index))
    x0 = torch.zeros(0, 5)
    A0, B0 = A[0].clone().requires_grad_(True), B[0].clone().requires_grad_(True)
    y0 = lora_grouped_add_(F.linear(x0, W), x0, [A0], [B0], [1.0], torch.zeros(0, dtype=torch.int64))
    y0.sum().backward()
    assert y0.shape == (0, 3) and not A0.grad.any()


def test_a_view_is_added_out_of_place():
    x, W, A, B, index = _tensors(4, 5, 3, (2,), torch.float32)
    W.requires_grad_(True)
    base = F.linear(x, W)
    out = lora_grouped_add_(base.view(2, 2, 3), x.view(2, 2, 5), A, B, [1.5], index)
    assert out.data_ptr() != base.data_ptr()
    torch.testing.assert_close(out.view(4, 3), reference_lora_grouped_add(F.linear(x, W), x, A, B, [1.5], index))
    out.sum().backward()
    assert W.grad is not None


def test_refuses_mismatched_inputs():
    x, W, A, B, index = _tensors(4, 5, 3, (2,), torch.float32)
    with pytest.raises(ValueError, match="adapter 0"):
        lora_grouped_add_(F.linear(x, W), x, [A[0].t()], B, [1.0], index)
    with pytest.raises(ValueError, match="index"):
        lora_grouped_add_(F.linear(x, W), x, A, B, [1.0], index[:3])
    with pytest.raises(ValueError, match="must match"):
        lora_grouped_add_(F.linear(x, W), x, A, B, [1.0, 2.0], index)
