"""IA3 layers against a plain-PyTorch reference: forward and gradients per dtype, odd shapes, merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftcore
from peftcore.errors import AdapterStateError
from peftcore_ia3 import IA3Layer, IA3Spec

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def reference_ia3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor, spec: IA3Spec) -> torch.Tensor:
    """IA3 from its definition. weight: (out, in); l: (in,) feed-forward, else (end - start,)."""
    if spec.feedforward:
        return F.linear(x * l, weight, bias)
    y = F.linear(x, weight, bias)  # (*, out)
    start, end = spec.out_slice or (0, y.shape[-1])
    multiplier = torch.cat([torch.ones(start, dtype=l.dtype), l, torch.ones(y.shape[-1] - end, dtype=l.dtype)])
    return y * multiplier


class Attn(nn.Module):
    """GPT-2's packed projection: c_attn = Conv1D(3 * n_embd, n_embd), plus a plain Linear."""

    def __init__(self, n_embd: int = 12):
        super().__init__()
        self.c_attn = Conv1D(3 * n_embd, n_embd)
        self.proj = nn.Linear(n_embd * 3 + 1, n_embd - 1)  # odd sizes

    def forward(self, x):
        return self.c_attn(x)


def _layer(kind: str, dtype: torch.dtype) -> tuple[IA3Layer, torch.Tensor, IA3Spec]:
    """A wrapped module with random l, a random input (odd shapes), and its spec."""
    torch.manual_seed(0)
    if kind == "conv1d_packed":
        model, path, shape = Attn(), "c_attn", (2, 7, 12)
        peftcore.wrap(model, "ia3", targets=[path], feedforward=[])
    else:
        model, path, shape = nn.Sequential(nn.Linear(37, 23)), "0", (3, 5, 37)
        peftcore.wrap(model, "ia3", targets=[path], feedforward=["0"] if kind == "linear_ff" else [])
    model.to(dtype)
    layer = model.get_submodule(path)
    with torch.no_grad():
        layer.ia3_l["default"].copy_(1 + 0.5 * torch.randn(layer.ia3_l["default"].shape))
    return layer, torch.randn(shape, dtype=dtype), layer.ia3_spec["default"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear_out", "linear_ff", "conv1d_packed"])
def test_forward_and_gradients_match_the_reference(kind, dtype):
    layer, x, spec = _layer(kind, dtype)
    x.requires_grad_(True)
    y = layer(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad_out)

    l_ref = layer.ia3_l["default"].detach().float().requires_grad_(True)
    x_ref = x.detach().float().requires_grad_(True)
    weight = layer.base_weight().detach().float()
    bias = layer.base_layer.bias.detach().float()
    y_ref = reference_ia3(x_ref, weight, bias, l_ref, spec)
    y_ref.backward(grad_out.float())

    assert y.dtype == dtype and layer.ia3_l["default"].grad.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, **TOL[dtype])
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **TOL[dtype])
    # l's gradient sums over every position: scale the tolerance with the number of terms
    tol = {k: v * (1 if dtype == torch.float32 else 4) for k, v in TOL[dtype].items()}
    torch.testing.assert_close(layer.ia3_l["default"].grad.float(), l_ref.grad, **tol)
    assert layer.base_layer.weight.grad is None  # the base stays frozen


def test_packed_c_attn_scales_only_keys_and_values():
    layer, x, spec = _layer("conv1d_packed", torch.float32)
    assert spec == IA3Spec(feedforward=False, out_slice=(12, 36)) and layer.ia3_l["default"].shape == (24,)
    with torch.no_grad():
        y, base = layer(x), layer.base_layer(x)
    assert torch.equal(y[..., :12], base[..., :12])  # queries untouched
    torch.testing.assert_close(y[..., 12:], base[..., 12:] * layer.ia3_l["default"])


def test_cross_attention_c_attn_is_all_keys_and_values():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(2 * 8, 8)  # GPT-2 cross-attention: k and v only

    model = peftcore.wrap(Cross(), "ia3", targets=["c_attn"], feedforward=[])
    assert model.c_attn.ia3_spec["default"] == IA3Spec(feedforward=False, out_slice=None)
    assert model.c_attn.ia3_l["default"].shape == (16,)


@pytest.mark.parametrize("kind", ["linear_out", "linear_ff", "conv1d_packed"])
def test_merge_scales_rows_or_columns_and_unmerge_divides_back(kind):
    layer, x, spec = _layer(kind, torch.float32)
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        adapted = layer(x)
        layer.merge("default")
        merged_weight = layer.base_weight().detach().clone()
        merged = layer(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.linear(x, merged_weight, layer.base_layer.bias), adapted, rtol=1e-5, atol=1e-6)
    l = layer.ia3_l["default"].detach()
    layer_weight = weight.t() if kind == "conv1d_packed" else weight  # (out, in)
    if spec.feedforward:
        expected = layer_weight * l[None, :]
        assert torch.equal(layer.base_layer.bias, bias)  # input scaling leaves the bias alone
    else:
        start, end = spec.out_slice or (0, layer_weight.shape[0])
        expected = layer_weight.clone()
        expected[start:end] *= l[:, None]
    torch.testing.assert_close(merged_weight, expected, rtol=0, atol=0)
    layer.unmerge("default")
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.base_layer.bias, bias, rtol=1e-6, atol=1e-7)


def test_several_active_adapters_multiply():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    peftcore.wrap(model, "ia3", targets=["0"], feedforward=[], name="a")
    peftcore.wrap(model, "ia3", targets=["0"], feedforward=[], name="b")
    layer = model[0]
    with torch.no_grad():
        layer.ia3_l["a"].fill_(2.0)
        layer.ia3_l["b"].copy_(torch.arange(1.0, 5.0))
    peftcore.activate(model, ["a", "b"])
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), layer.base_layer(x) * 2.0 * torch.arange(1.0, 5.0))


def test_unmerge_refuses_vectors_near_zero_and_leaves_the_model_merged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    peftcore.wrap(model, "ia3", targets=["0", "2"], feedforward=["2"])
    with torch.no_grad():
        model[2].ia3_l["default"][1] = 0.0  # the second layer's vector cannot be divided back
    peftcore.merge(model)
    weights = [m.base_layer.weight.detach().clone() for m in (model[0], model[2])]
    with pytest.raises(AdapterStateError, match="cannot unmerge IA3 adapter 'default': 1 entries .* below 1e-06.*merge=True"):
        peftcore.unmerge(model)
    assert all(torch.equal(m.base_layer.weight, w) for m, w in zip((model[0], model[2]), weights))
    assert peftcore.adapters(model)["default"].merged
    peftcore.unwrap(model, merge=True)
    assert isinstance(model[0], nn.Linear)
