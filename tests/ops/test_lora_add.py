"""lora_add_ (the LoRA path added into a given base output in place) against its reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcore.ops.lora import reference_lora_linear
from peftcore.ops.lora_add import lora_add_, reference_lora_add

# rtol, and atol relative to the largest magnitude of the reference (computed in float64)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SHAPES = [(1, 1, 1, 1), (3, 7, 5, 2), (6, 42, 123, 16)]  # (M, K, N, r)


def _tensors(M, K, N, r, dtype, lead=()):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return make(*lead, M, K), make(N, K), make(r, K), make(N, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_and_gradients_match_the_reference(shape, dtype, p):
    M, K, N, r = shape
    x, W, A, B = _tensors(M, K, N, r, dtype, lead=(2,))
    seed = torch.tensor(1234, dtype=torch.int64)
    leaves = [t.clone().requires_grad_(True) for t in (x, W, A, B)]
    ref_leaves = [t.double().requires_grad_(True) for t in (x, W, A, B)]
    y = lora_add_(F.linear(leaves[0], leaves[1]), leaves[0], leaves[2], leaves[3], 0.7, p, seed)
    y_ref = reference_lora_add(F.linear(ref_leaves[0], ref_leaves[1]), ref_leaves[0], ref_leaves[2], ref_leaves[3], 0.7, p, seed)
    _close(y, y_ref, TOL[dtype])
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad)
    y_ref.backward(grad.double())
    for got, want in zip(leaves, ref_leaves):
        _close(got.grad, want.grad, TOL[dtype])


def _close(got, want, tol):
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_the_mask_is_lora_linears_for_the_same_seed():
    x, W, A, B = _tensors(9, 13, 6, 3, torch.float64)
    for seed in (0, 7, 2**62, -5):
        y = lora_add_(F.linear(x, W), x, A, B, 2.0, 0.5, seed)
        torch.testing.assert_close(y, reference_lora_linear(x, W, None, A, B, 2.0, 0.5, seed))


def test_adds_in_place_and_handles_an_empty_batch():
    x, W, A, B = _tensors(4, 5, 3, 2, torch.float32)
    y = F.linear(x, W)
    assert lora_add_(y, x, A, B, 1.0).data_ptr() == y.data_ptr()
    A.requires_grad_(True)
    B.requires_grad_(True)
    x0 = torch.zeros(0, 5)
    y0 = lora_add_(F.linear(x0, W.requires_grad_(True)), x0, A, B, 1.0)
    y0.sum().backward()
    assert y0.shape == (0, 3) and not A.grad.any() and not B.grad.any()


def test_no_grad_inference():
    x, W, A, B = _tensors(4, 5, 3, 2, torch.float32)
    with torch.no_grad():
        y = lora_add_(F.linear(x, W), x, A.requires_grad_(True), B.requires_grad_(True), 1.5)
    torch.testing.assert_close(y, reference_lora_add(F.linear(x, W), x, A, B, 1.5).detach())


def test_a_view_is_added_out_of_place():
    x, W, A, B = _tensors(4, 5, 3, 2, torch.float32)
    W.requires_grad_(True)
    base = F.linear(x, W)
    y = base.view(2, 2, 3)
    out = lora_add_(y, x.view(2, 2, 5), A, B, 1.5)
    assert out.data_ptr() != base.data_ptr()
    torch.testing.assert_close(out, reference_lora_add(F.linear(x, W), x, A, B, 1.5).view(2, 2, 3))
    out.sum().backward()
    assert W.grad is not None
