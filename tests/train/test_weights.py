"""Saving and loading the trained parameters of a layer strategy."""

import pytest
import torch

from peftcore.errors import CheckpointError
from peftcore.train import apply_strategy, load_weights, save_weights
from train_models import tiny_bert


def test_round_trip_writes_only_the_trained_parameters(tmp_path):
    model = tiny_bert()
    plan = apply_strategy(model, "partial", freeze_blocks=2)
    with torch.no_grad():
        for _, p in plan.named_parameters():
            p.add_(1.0)
    path = save_weights(plan.named_parameters(), tmp_path / "w.safetensors", metadata={"strategy": "partial"})
    fresh = tiny_bert()
    loaded = load_weights(fresh, path)
    assert sorted(loaded) == sorted(plan.names.values())
    assert not any(n.startswith("bert.encoder.layer.0.") or n.startswith("bert.embeddings.") for n in loaded)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob(".*tmp*"))


def test_mismatches_are_named_and_leave_the_model_unchanged(tmp_path):
    model = tiny_bert(num_labels=3)
    save_weights(list(model.named_parameters()), tmp_path / "w.safetensors")
    other = tiny_bert(num_labels=4, seed=1)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(CheckpointError, match=r"classifier.weight: saved shape \(3, 16\), model has \(4, 16\)"):
        load_weights(other, tmp_path / "w.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    with pytest.raises(CheckpointError, match="no weights file"):
        load_weights(other, tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(other, tmp_path / "bad.safetensors")
