"""Per-example routing (``adapter_names=``) over quantized bases: each example gets what its adapter
alone gives, ``__base__`` examples the quantized base's own output, each adapter's gradient comes
from its own rows, seeded dropout, ``generate`` and ``hotswap``; on nf4, int8 and torchao int8."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftcore
from peftcore.routing import BASE
from peftcore.testing import check_routing
from peftcore_quant import QuantLoraLinear

from _models import quantized_llama

KINDS = ["nf4", "int8", "torchao-int8"]
NAMES = ["a", "b", BASE, "a"]


def _two_adapters(kind, dropout=0.0):
    """A tiny quantized Llama with adapters a (rank 4, every linear layer) and b (rank 2, rsLoRA,
    another alpha, three of them), both with non-zero deltas."""
    model = quantized_llama(kind)
    peftcore.wrap(model, "lora", name="a", rank=4, alpha=8, targets="all-linear", dropout=dropout)
    peftcore.wrap(model, "lora", name="b", rank=2, alpha=3, rslora=True, targets=["q_proj", "v_proj", "down_proj"],
                  dropout=dropout / 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    assert any(isinstance(m, QuantLoraLinear) for m in model.modules())
    return model


def _ids(batch=4):
    return torch.randint(0, 128, (batch, 8), generator=torch.Generator().manual_seed(1))


def _alone(model, name, ids):
    with torch.no_grad():
        if name == BASE:
            with peftcore.disabled(model):
                return model(input_ids=ids).logits
        peftcore.activate(model, name)
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", KINDS)
def test_each_example_gets_its_adapter_and_base_rows_the_quantized_base(kind):
    model = _two_adapters(kind)
    ids = _ids()
    with torch.no_grad():
        routed = model(input_ids=ids, adapter_names=NAMES).logits
    for i, name in enumerate(NAMES):
        want = _alone(model, name, ids)[i]
        if name == BASE:  # the quantized layer's own output, untouched
            torch.testing.assert_close(routed[i], want, rtol=0, atol=0)
        else:
            torch.testing.assert_close(routed[i], want, rtol=1e-5, atol=1e-5)


def _grads(model, ids, adapter_names=None, active=None):
    """Gradients of every LoRA factor for the sum of per-example losses (independent of the batch)."""
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    if active is not None:
        peftcore.activate(model, active)
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
    logits = model(input_ids=ids, **kwargs).logits[:, :-1]
    per_token = nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="none")
    per_token.reshape(len(ids), -1).mean(1).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("kind", KINDS)
def test_each_adapter_learns_from_its_own_rows_only(kind):
    base = _two_adapters(kind)
    peftcore.wrap(base, "lora", name="c", rank=2, targets=["o_proj"])  # in no row of the batch
    base.train()
    ids = _ids()
    names = ["a", "b", BASE, "a"]
    mixed = _grads(copy.deepcopy(base), ids, names)
    only_a = _grads(copy.deepcopy(base), ids[[0, 3]], active="a")
    only_b = _grads(copy.deepcopy(base), ids[[1]], active="b")
    for name, grad in mixed.items():
        adapter = name.rsplit(".", 1)[1]  # ...q_proj.lora_A.<adapter>
        if adapter == "c":
            assert grad is None, name  # no row: not even a zero gradient
            continue
        torch.testing.assert_close(grad, (only_a if adapter == "a" else only_b)[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_seeded_and_is_the_unrouted_mask(kind):
    """Routing every row to a draws lora_add_'s mask for the same seed (the unrouted gradients);
    a mixed batch is reproducible under torch.manual_seed and the base row sees no dropout."""
    model = _two_adapters(kind, dropout=0.3).train()
    ids = _ids()

    torch.manual_seed(7)
    unrouted = _grads(model, ids, active="a")
    torch.manual_seed(7)
    routed = _grads(model, ids, ["a"] * 4)
    compared = [name for name in unrouted if name.endswith(".a")]
    assert compared
    for name in compared:
        torch.testing.assert_close(routed[name], unrouted[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.manual_seed(3)
        first = model(input_ids=ids, adapter_names=NAMES).logits
        torch.manual_seed(3)
        again = model(input_ids=ids, adapter_names=NAMES).logits
        torch.manual_seed(4)
        other_seed = model(input_ids=ids, adapter_names=NAMES).logits
        with peftcore.disabled(model):
            base = model(input_ids=ids).logits  # training mode too (bitsandbytes' int8 differs there)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first[0], other_seed[0])  # dropout acts on the adapters' rows
    torch.testing.assert_close(first[2], base[2], rtol=0, atol=0)  # and not on the base row


@pytest.mark.parametrize("kind", KINDS)
def test_generate_routes_each_prompt(kind):
    model = _two_adapters(kind)
    ids = _ids(batch=3)[:, :4]
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    names = ["a", BASE, "b"]
    routed = model.generate(ids, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        if name == BASE:
            with peftcore.disabled(model):
                want = model.generate(ids, **kwargs)
        else:
            peftcore.activate(model, name)
            want = model.generate(ids, **kwargs)
        assert torch.equal(routed[i], want[i]), name


def test_hotswapped_slot_routes_the_new_adapter(tmp_path):
    """A user's flow: adapters saved from quantized models, peftcore.load twice, hotswap one slot."""
    for dirname, seed, rank in (("first", 1, 4), ("second", 2, 2), ("other", 3, 4)):
        saved = quantized_llama("nf4")
        peftcore.wrap(saved, "lora", rank=rank, alpha=8, targets=["q_proj", "v_proj"])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in saved.named_parameters():
                if ".lora_" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        peftcore.save(saved, tmp_path / dirname)
    want = peftcore.load(quantized_llama("nf4"), tmp_path / "second")
    model = peftcore.load(quantized_llama("nf4"), tmp_path / "first", name="default")
    peftcore.load(model, tmp_path / "other", name="other")
    ids = _ids()
    peftcore.hotswap(model, tmp_path / "second", name="default")
    with torch.no_grad():
        routed = model(input_ids=ids, adapter_names=["default", "other", BASE, "default"]).logits
        expected = want(input_ids=ids).logits
    for i in (0, 3):
        torch.testing.assert_close(routed[i], expected[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_dora_over_a_quantized_base_routes_each_example_to_its_adapter(kind):
    """DoRA layers (peftcore-dora's routed forward around the quantized layer's own output)."""
    model = quantized_llama(kind)
    peftcore.wrap(model, "dora", name="a", rank=4, alpha=8, targets="all-linear")
    peftcore.wrap(model, "dora", name="b", rank=2, alpha=3, targets=["q_proj", "down_proj"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    check_routing(model, {"input_ids": _ids()}, NAMES)  # forward per example and mixed-batch gradients
