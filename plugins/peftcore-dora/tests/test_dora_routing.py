"""DoRA under per-example routing: model(..., adapter_names=[...]) gives each row its own adapter."""

from __future__ import annotations

import pytest
import torch

import peftcore
from peftcore.routing import BASE
from peftcore.testing import tiny_model


def _two_adapters(family: str, **b_options):
    """DoRA adapters a (rank 4) and b (rank 2, other alpha), with non-zero B and moved magnitudes."""
    model = tiny_model(family)
    peftcore.wrap(model, "dora", name="a", rank=4, alpha=8)
    peftcore.wrap(model, "dora", name="b", rank=2, alpha=3, **b_options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def _alone(model, name, inputs):
    if name == BASE:
        with peftcore.disabled(model), torch.no_grad():
            return model(**inputs).logits
    peftcore.activate(model, name)
    with torch.no_grad():
        return model(**inputs).logits


def _inputs(batch: int = 4):
    ids = torch.randint(0, 128, (batch, 6), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])  # gpt2: Conv1D layers, bert: biases
def test_each_example_gets_its_adapter_and_base_rows_the_base(family):
    model = _two_adapters(family)
    inputs = _inputs()
    names = ["a", BASE, "b", "a"]
    with torch.no_grad():
        got = model(**inputs, adapter_names=names).logits
    for row, name in enumerate(names):
        alone = _alone(model, name, {k: v[row:row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(got[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_trains_each_adapter_from_its_own_rows():
    model = _two_adapters("llama")  # eval mode: no dropout anywhere, gradients as in training
    inputs = _inputs()
    names = ["b", "a", "a", BASE]
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    model(**inputs, adapter_names=names).logits.sum().backward()
    mixed = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(names) if n == name]
        peftcore.activate(model, name)
        model(**{k: v[rows] for k, v in inputs.items()}).logits.sum().backward()
    for n, p in params.items():
        torch.testing.assert_close(mixed[n], p.grad, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in mixed.values())
