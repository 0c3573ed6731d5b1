"""DoRA layers against the plain-PyTorch reference: forward and gradients per dtype, odd shapes, merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftcore
from peftcore.errors import AdapterStateError
from peftcore_dora import DoraLayer, reference_dora_weight

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def reference_forward(x, weight, bias, A, B, m, scale):
    """DoRA's forward with ||V|| detached, as the paper (section 4.3) and the layer do.

    Differentiating through the norm would give other gradients for A and B; the value is
    :func:`reference_dora_weight`'s either way (checked below).
    """
    direction = weight + scale * (B @ A)  # (out, in)
    norm = direction.norm(p=2, dim=1).detach()
    return F.linear(x, (m / norm)[:, None] * direction, bias)


def _wrapped(kind: str, dtype: torch.dtype, rank: int = 3, alpha: float = 5.0) -> tuple[nn.Module, DoraLayer, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        model, shape = nn.Sequential(nn.Linear(37, 23)), (3, 5, 37)
    else:
        model, shape = nn.Sequential(Conv1D(20, 12)), (2, 7, 12)  # weight (in=12, out=20)
    peftcore.wrap(model, "dora", targets=["0"], rank=rank, alpha=alpha)
    layer = model[0]
    with torch.no_grad():  # an informative adapter: B non-zero, m away from ||W||
        layer.lora_B["default"].normal_(0, 0.2)
        layer.lora_magnitude_vector["default"].mul_(1 + 0.3 * torch.randn(layer.lora_magnitude_vector["default"].shape))
    model.to(dtype)
    return model, layer, torch.randn(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_gradients_match_the_reference(kind, dtype):
    model, layer, x = _wrapped(kind, dtype)
    x.requires_grad_(True)
    y = model(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad_out)

    params = {k: getattr(layer, k)["default"] for k in ("lora_A", "lora_B", "lora_magnitude_vector")}
    refs = {k: p.detach().float().requires_grad_(True) for k, p in params.items()}
    x_ref = x.detach().float().requires_grad_(True)
    weight, bias = layer.base_weight().detach().float(), layer.base_layer.bias.detach().float()
    y_ref = reference_forward(x_ref, weight, bias, refs["lora_A"], refs["lora_B"], refs["lora_magnitude_vector"], 5.0 / 3)
    y_ref.backward(grad_out.float())

    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, **TOL[dtype])
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **TOL[dtype])
    for key, param in params.items():
        assert param.grad is not None and param.grad.dtype == dtype, key
        # parameter gradients sum over every position: looser in bfloat16
        tol = {k: v * (1 if dtype == torch.float32 else 4) for k, v in TOL[dtype].items()}
        torch.testing.assert_close(param.grad.float(), refs[key].grad, **tol, msg=lambda m: f"{key}: {m}")
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_is_the_decomposed_weight(kind):
    model, layer, x = _wrapped(kind, torch.float32)
    A, B, m = (getattr(layer, k)["default"].detach() for k in ("lora_A", "lora_B", "lora_magnitude_vector"))
    expected_weight = reference_dora_weight(layer.base_weight().detach(), A, B, m, 5.0 / 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, expected_weight, layer.base_layer.bias), rtol=1e-5, atol=1e-5)
    # ||W'|| = |m| row by row: the magnitude is exactly what m says
    torch.testing.assert_close(expected_weight.norm(dim=1), m.abs(), rtol=1e-5, atol=1e-6)


def test_magnitude_starts_at_the_weight_norms_and_the_layer_is_the_identity():
    torch.manual_seed(0)
    base = nn.Linear(9, 6)
    model = peftcore.wrap(nn.Sequential(base), "dora", targets=["0"], rank=2)
    torch.testing.assert_close(model[0].lora_magnitude_vector["default"], base.weight.norm(dim=1), rtol=0, atol=0)
    assert torch.count_nonzero(model[0].lora_B["default"]) == 0
    x = torch.randn(4, 9)
    torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_writes_the_reference_weight_and_unmerge_restores_the_base(kind):
    model, layer, x = _wrapped(kind, torch.float32)
    weight = layer.base_layer.weight.detach().clone()
    A, B, m = (getattr(layer, k)["default"].detach() for k in ("lora_A", "lora_B", "lora_magnitude_vector"))
    expected = reference_dora_weight(layer.base_weight().detach(), A, B, m, 5.0 / 3)
    with torch.no_grad():
        adapted = model(x)
        peftcore.merge(model)
        torch.testing.assert_close(layer.base_weight(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
        peftcore.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=1e-5, atol=1e-6)
    assert layer.merged_norms == {}


def test_two_unmerged_adapters_cannot_run_together_but_a_merged_one_composes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5))
    peftcore.wrap(model, "dora", targets=["0"], rank=2, name="a")
    peftcore.wrap(model, "dora", targets=["0"], rank=2, name="b")
    layer = model[0]
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_B[name].normal_(0, 0.3)
    with pytest.raises(AdapterStateError, match=r"DoRA adapters \['a', 'b'\] cannot run together"):
        peftcore.activate(model, ["a", "b"])
    assert peftcore.adapters(model)["b"].active and not peftcore.adapters(model)["a"].active  # unchanged

    peftcore.activate(model, "a")
    peftcore.merge(model)  # a is in the weight now; b runs on top of it
    peftcore.activate(model, ["a", "b"])
    x = torch.randn(3, 8)
    W0 = layer.base_layer.weight.detach().clone()  # = a's merged weight
    Wb = reference_dora_weight(W0, layer.lora_A["b"].detach(), layer.lora_B["b"].detach(),
                               layer.lora_magnitude_vector["b"].detach(), 2.0)
    torch.testing.assert_close(model(x), F.linear(x, Wb, layer.base_layer.bias), rtol=1e-5, atol=1e-5)


def test_unmerge_refuses_zero_magnitudes_and_leaves_the_model_merged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    peftcore.wrap(model, "dora", targets=["0"], rank=2)
    with torch.no_grad():
        model[0].lora_magnitude_vector["default"][2] = 0.0
    peftcore.merge(model)
    merged = model[0].base_layer.weight.detach().clone()
    with pytest.raises(AdapterStateError, match="cannot unmerge DoRA adapter 'default': 1 entries of its magnitude"):
        peftcore.unmerge(model)
    assert torch.equal(model[0].base_layer.weight, merged) and peftcore.adapters(model)["default"].merged
