"""DoRA under per-example routing: model(..., adapter_names=[...]) gives each row its own adapter."""

from __future__ import annotations

import pytest
import torch

import peftcore
from peftcore.routing import BASE
from peftcore.testing import check_routing, tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])  # gpt2: Conv1D layers, bert: biases
def test_each_example_gets_its_adapter_forward_and_gradients(family):
    """DoRA adapters a (rank 4) and b (rank 2, other alpha), non-zero B and moved magnitudes, beside base rows."""
    model = tiny_model(family)
    peftcore.wrap(model, "dora", name="a", rank=4, alpha=8)
    peftcore.wrap(model, "dora", name="b", rank=2, alpha=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 128, (4, 6), generator=g)
    check_routing(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["b", "a", BASE, "a"])
