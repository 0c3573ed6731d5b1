"""IA3 under per-example routing: model(..., adapter_names=[...]) scales each row by its own adapter."""

from __future__ import annotations

import pytest
import torch

import peftcore
from peftcore.routing import BASE
from peftcore.testing import tiny_model


def _two_adapters(family: str):
    """IA3 adapters a and b on every default target (output and feed-forward kinds), vectors away from 1."""
    model = tiny_model(family)
    peftcore.wrap(model, "ia3", name="a")
    peftcore.wrap(model, "ia3", name="b")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


def _logits(out):
    return out.logits


def _alone(model, name, inputs):
    if name == BASE:
        with peftcore.disabled(model), torch.no_grad():
            return _logits(model(**inputs))
    peftcore.activate(model, name)
    with torch.no_grad():
        return _logits(model(**inputs))


def _inputs(batch: int = 4):
    ids = torch.randint(0, 128, (batch, 6), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_each_example_gets_its_adapter_and_base_rows_the_base(family):
    model = _two_adapters(family)
    kinds = {spec.feedforward for layer in model.modules() if hasattr(layer, "ia3_spec") for spec in layer.ia3_spec.values()}
    assert kinds == {True, False}  # both kinds of IA3 layer are routed
    inputs = _inputs()
    names = ["a", BASE, "b", "a"]
    with torch.no_grad():
        got = _logits(model(**inputs, adapter_names=names))
    for row, name in enumerate(names):
        alone = _alone(model, name, {k: v[row:row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(got[row:row + 1], alone, rtol=1e-5, atol=1e-6)


def test_a_mixed_batch_trains_each_adapter_from_its_own_rows():
    model = _two_adapters("gpt2")  # eval mode: GPT-2's own dropout off, gradients as in training
    inputs = _inputs()
    names = ["b", "a", "a", BASE]
    params = {n: p for n, p in model.named_parameters() if ".ia3_l." in n}
    for p in params.values():
        p.requires_grad_(True)
    model(**inputs, adapter_names=names).logits.sum().backward()
    mixed = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    for name in ("a", "b"):  # each adapter alone on its rows, the loss summed the same way
        rows = [i for i, n in enumerate(names) if n == name]
        peftcore.activate(model, name)
        model(**{k: v[rows] for k, v in inputs.items()}).logits.sum().backward()
    for n, p in params.items():
        torch.testing.assert_close(mixed[n], p.grad, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in mixed.values())
