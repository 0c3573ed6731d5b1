"""Hot swap: another saved LoRA adapter's weights into a slot, in place; a torch.compile'd model
does not recompile (dynamo's frame counter), smaller ranks are padded, misfits refused."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import peftcore
from peftcore.errors import AdapterStateError, CheckpointError
from models import mlp


def _saved(tmp_path, dirname, seed, **options):
    model = mlp()
    peftcore.wrap(model, "lora", targets=["fc1", "fc2"], **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    peftcore.save(model, tmp_path / dirname)
    return model


def _out(model, ids):
    with torch.no_grad():
        return model(ids)


def test_compiled_model_runs_the_new_adapter_without_recompiling(tmp_path):
    first = _saved(tmp_path, "first", seed=1, rank=4, alpha=8)
    same = _saved(tmp_path, "same", seed=2, rank=4, alpha=8)
    smaller = _saved(tmp_path, "smaller", seed=3, rank=2, alpha=5, rslora=True)  # padded, another scale
    ids = torch.randint(0, 20, (2, 5))

    model = mlp()
    peftcore.load(model, tmp_path / "first")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch.testing.assert_close(_out(compiled, ids), _out(first, ids))
    frames = counter.frame_count
    assert frames >= 1
    for saved, want in (("same", same), ("smaller", smaller), ("first", first)):
        peftcore.hotswap(compiled, tmp_path / saved)
        torch.testing.assert_close(_out(compiled, ids), _out(want, ids), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == frames  # no recompilation


def test_misfits_are_refused_and_nothing_is_written(tmp_path):
    _saved(tmp_path, "big", seed=1, rank=8)
    other_targets = mlp()
    peftcore.wrap(other_targets, "lora", targets=["fc1"], rank=2)
    peftcore.save(other_targets, tmp_path / "targets")
    model = mlp()
    peftcore.wrap(model, "lora", targets=["fc1", "fc2"], rank=4)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match="fc1.*rank >= 8"):
        peftcore.hotswap(model, tmp_path / "big")
    with pytest.raises(CheckpointError, match="other modules"):
        peftcore.hotswap(model, tmp_path / "targets")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    peftcore.merge(model, "default")
    with pytest.raises(AdapterStateError, match="merged"):
        peftcore.hotswap(model, tmp_path / "big")
