"""LoRA layers: forward and merge per layer kind, inits, scaling, dropout, config validation."""

import math

import pytest
import torch
from torch import nn

import peftcore
from peftcore.tuners.lora import LoraConfig
from peftcore.tuners.lora.layers import LoraConv, LoraEmbedding, LoraHFConv1D, LoraLinear


def _randomise(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(layer.lora_A.values()) + list(layer.lora_B.values()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _wrap_single(module, **options):
    holder = nn.Sequential(module)
    peftcore.wrap(holder, "lora", targets=["0"], **options)
    layer = holder[0]
    _randomise(layer)
    return holder, layer


def test_linear_forward_is_base_plus_scaled_low_rank():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    holder, layer = _wrap_single(base, rank=3, alpha=6)
    x = torch.randn(4, 7)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A["default"].T) @ layer.lora_B["default"].T
    torch.testing.assert_close(holder(x), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(layer, LoraLinear) and layer.lora_A["default"].shape == (3, 7) and layer.lora_B["default"].shape == (5, 3)


def test_hf_conv1d_uses_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(5, 7)  # nf=5 outputs, nx=7 inputs, weight (7, 5)
    holder, layer = _wrap_single(base, rank=2, alpha=2)
    x = torch.randn(2, 3, 7)
    expected = x @ base.weight + base.bias + (x @ layer.lora_A["default"].T) @ layer.lora_B["default"].T
    assert isinstance(layer, LoraHFConv1D)
    torch.testing.assert_close(holder(x), expected, rtol=1e-5, atol=1e-6)


def test_embedding_forward_and_zero_delta_at_init():
    torch.manual_seed(0)
    base = nn.Embedding(11, 6, padding_idx=0)
    holder = nn.Sequential(base)
    ids = torch.tensor([[0, 3, 10], [4, 4, 1]])
    before = holder(ids)
    peftcore.wrap(holder, "lora", targets=["0"], rank=2, alpha=2)
    layer = holder[0]
    assert isinstance(layer, LoraEmbedding)
    torch.testing.assert_close(holder(ids), before, rtol=0, atol=0)
    _randomise(layer)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = base.weight[ids] + A.T[ids] @ B.T
    torch.testing.assert_close(holder(ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    (lambda: nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=(1, 2)), (2, 3, 9, 8)),
    (lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4)),
])
def test_conv_forward_and_merge(conv, shape):
    torch.manual_seed(0)
    base = conv()
    holder, layer = _wrap_single(base, rank=2)
    assert isinstance(layer, LoraConv)
    x = torch.randn(shape)
    fn = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}[x.dim() - 2]
    h = fn(x, layer.lora_A["default"], None, base.stride, base.padding, base.dilation)
    expected = base(x) + layer.lora_config["default"].scale * fn(h, layer.lora_B["default"])
    with torch.no_grad():
        torch.testing.assert_close(holder(x), expected, rtol=1e-5, atol=1e-5)
        peftcore.merge(holder)
        torch.testing.assert_close(holder(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(6, 4),
    lambda: nn.Embedding(9, 4),
])
def test_merge_unmerge_per_kind(make):
    torch.manual_seed(0)
    holder, layer = _wrap_single(make(), rank=2)
    x = torch.randint(0, 9, (3, 5)) if isinstance(layer, LoraEmbedding) else torch.randn(3, 6)
    with torch.no_grad():
        unmerged = holder(x)
        weight = layer.base_layer.weight.clone()
        peftcore.merge(holder)
        assert not torch.equal(layer.base_layer.weight, weight)
        torch.testing.assert_close(holder(x), unmerged, rtol=1e-5, atol=1e-6)
        peftcore.unmerge(holder)
        torch.testing.assert_close(layer.base_layer.weight, weight, rtol=1e-6, atol=1e-6)


def test_conv_groups_are_refused_with_a_hint():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(peftcore.UnsupportedModuleError, match="Conv2d.*register_layer"):
        peftcore.wrap(model, "lora", targets=["0"])


def test_subclass_with_own_forward_needs_a_handler():
    class QuantLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x).round()

    model = nn.Sequential(QuantLinear(3, 3))
    with pytest.raises(peftcore.UnsupportedModuleError, match="QuantLinear"):
        peftcore.wrap(model, "lora", targets=["0"])


def test_default_init_is_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    _, layer = _wrap_single(nn.Linear(64, 32), rank=8)
    layer = nn.Sequential(nn.Linear(64, 32))
    peftcore.wrap(layer, "lora", targets=["0"], rank=8)
    A, B = layer[0].lora_A["default"], layer[0].lora_B["default"]
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5) on fan_in 64
    assert torch.all(B == 0) and A.abs().max() <= bound and A.abs().max() > 0.8 * bound


def test_gaussian_init():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128))
    peftcore.wrap(model, "lora", targets=["0"], rank=4, init="gaussian")
    A = model[0].lora_A["default"]
    assert abs(A.std().item() - 0.25) < 0.02 and torch.all(model[0].lora_B["default"] == 0)


def test_pissa_takes_principal_components():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    original = base.weight.detach().clone()
    model = nn.Sequential(base)
    peftcore.wrap(model, "lora", targets=["0"], rank=3, init="pissa")
    layer = model[0]
    delta = layer.delta_weight("default")
    torch.testing.assert_close(layer.base_layer.weight + delta, original, rtol=1e-5, atol=1e-5)
    U, S, Vh = torch.linalg.svd(original)
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:3], S[:3], rtol=1e-4, atol=1e-5)
    assert torch.linalg.svdvals(delta)[3:].abs().max() < 1e-5  # rank 3
    peftcore.unwrap(model)
    assert torch.equal(model[0].weight, original)


def test_pissa_only_on_linear_layers():
    model = nn.Sequential(nn.Embedding(5, 4))
    with pytest.raises(peftcore.ConfigError, match="init='pissa' works on linear layers only"):
        peftcore.wrap(model, "lora", targets=["0"], init="pissa")


def test_scale_alpha_rslora_and_defaults():
    assert LoraConfig(rank=8).alpha == 16.0 and LoraConfig(rank=8).scale == 2.0
    assert LoraConfig(rank=4, alpha=8).scale == 2.0
    assert LoraConfig(rank=16, alpha=8, rslora=True).scale == 2.0
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        LoraConfig(alpha=float("nan"))
    with pytest.raises(ValueError, match="rslora must be True or False"):
        LoraConfig(rslora="yes")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoraConfig(rank=2.5)


def test_dropout_applies_in_training_only_and_follows_the_seed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    peftcore.wrap(model, "lora", targets=["0"], rank=4, dropout=0.5)
    _randomise(model[0])
    x = torch.randn(5, 16)
    model.eval()
    no_dropout = model(x)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    c = model(x)
    assert not torch.allclose(a, no_dropout) and torch.equal(a, b) and not torch.equal(b, c)
    model.eval()
    torch.testing.assert_close(model(x), no_dropout, rtol=0, atol=0)


def test_layer_reads_base_attributes():
    model = nn.Sequential(nn.Linear(6, 4))
    peftcore.wrap(model, "lora", targets=["0"])
    assert model[0].in_features == 6 and model[0].out_features == 4 and model[0].weight is model[0].base_layer.weight
