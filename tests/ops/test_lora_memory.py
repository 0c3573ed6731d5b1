"""What lora_linear keeps for backward: with q/k/v LoRA on one shared input and dropout 0.1,
about one input plus rank-sized tensors per layer (no masks, no dropped copies of x)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftcore
from peftcore.ops import _extension

HAS_CPP = _extension.load()[0]

D, RANK, BATCH, SEQ = 96, 8, 4, 50


class _QKV(nn.Module):
    """Three projections of one hidden state, as in attention; ``sum`` saves nothing of its own."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.query(x).sum() + self.key(x).sum() + self.value(x).sum()


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes of distinct storages saved for backward that are not parameters, and their count."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x)
    loss.backward()
    return sum(saved.values()), len(saved)


def _wrapped(backend: str) -> nn.Module:
    torch.manual_seed(0)
    model = _QKV()
    peftcore.wrap(model, "lora", rank=RANK, dropout=0.1, backend=backend)
    return model.train()


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_qkv_on_a_shared_input_save_one_input_and_rank_sized_tensors():
    x = torch.randn(BATCH, SEQ, D, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    rank_bytes = BATCH * SEQ * RANK * x.element_size()  # h = dropout(x) A^T, one per layer
    seed_bytes = 8
    total, count = _saved_activation_bytes(_wrapped("cpp"), x)
    assert total == input_bytes + 3 * (rank_bytes + seed_bytes)
    assert count == 1 + 3 * 2  # x once; h and the seed per layer


def test_the_reference_backend_saves_far_more():
    # The plain-PyTorch specification keeps masks and dropped copies of x per layer: this is what
    # the fused op avoids, and shows the measurement above can tell the difference.
    x = torch.randn(BATCH, SEQ, D, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    total, _ = _saved_activation_bytes(_wrapped("reference"), x)
    assert total > 3 * input_bytes
