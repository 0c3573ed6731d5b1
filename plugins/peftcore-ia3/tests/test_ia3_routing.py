"""IA3 under per-example routing: model(..., adapter_names=[...]) scales each row by its own adapter."""

from __future__ import annotations

import pytest
import torch

import peftcore
from peftcore.routing import BASE
from peftcore.testing import check_routing, tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_each_example_gets_its_adapter_forward_and_gradients(family):
    model = tiny_model(family)
    peftcore.wrap(model, "ia3", name="a")
    peftcore.wrap(model, "ia3", name="b")
    kinds = {spec.feedforward for layer in model.modules() if hasattr(layer, "ia3_spec") for spec in layer.ia3_spec.values()}
    assert kinds == {True, False}  # both kinds of IA3 layer are routed
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 128, (4, 6), generator=g)
    check_routing(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["b", "a", BASE, "a"])
