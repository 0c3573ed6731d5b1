"""Finding blocks, embeddings, top and head in transformers models, and explicit overrides."""

import pytest
import torch
from torch import nn

from models import gpt2, llama, minilm
from peftcore.errors import TargetError
from peftcore.train.structure import model_structure


def _partition_is_complete(model, s):
    names = [n for n, _ in model.named_parameters()]
    parts = list(s.embeddings) + [n for b in s.blocks for n in b] + list(s.top) + list(s.head)
    assert sorted(parts) == sorted(names) and len(parts) == len(set(parts))


def test_minilm_structure():
    model = minilm(num_labels=5)
    s = model_structure(model)
    assert s.block_paths == tuple(f"bert.encoder.layer.{i}" for i in range(6))
    assert s.head_paths == ("classifier",) and s.head == ("classifier.weight", "classifier.bias")
    assert s.top == ("bert.pooler.dense.weight", "bert.pooler.dense.bias")
    assert all(n.startswith("bert.embeddings.") for n in s.embeddings) and len(s.embeddings) == 5
    assert all(all(n.startswith(f"bert.encoder.layer.{i}.") for n in b) for i, b in enumerate(s.blocks))
    _partition_is_complete(model, s)
    assert [name for name, _ in s.layers()] == ["embeddings"] + [f"block.{i}" for i in range(6)] + ["head"]
    assert s.layers()[-2][1][-2:] == s.top  # the pooler goes with the top block


def test_gpt2_tied_head_owns_no_parameter():
    model = gpt2()
    s = model_structure(model)
    assert s.block_paths == ("transformer.h.0", "transformer.h.1")
    assert s.head_paths == ("lm_head",) and s.head == ()  # lm_head.weight is transformer.wte.weight
    assert s.embeddings == ("transformer.wte.weight", "transformer.wpe.weight")
    assert s.top == ("transformer.ln_f.weight", "transformer.ln_f.bias")
    _partition_is_complete(model, s)


def test_llama_structure():
    model = llama()
    s = model_structure(model)
    assert s.block_paths == ("model.layers.0", "model.layers.1")
    assert s.embeddings == ("model.embed_tokens.weight",) and s.top == ("model.norm.weight",) and s.head == ("lm_head.weight",)
    _partition_is_complete(model, s)


class Custom(nn.Module):
    """A model with no base_model and non-standard names."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Embedding(10, 4)
        self.stages = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.stages(self.stem(x)))


def test_custom_model_needs_and_accepts_explicit_names():
    model = Custom()
    with pytest.raises(TargetError, match="cannot find the task head of Custom.*head="):
        model_structure(model)
    with pytest.raises(TargetError, match="cannot find the blocks of Custom.*blocks="):
        model_structure(model, head=["out"])
    s = model_structure(model, head=["out"], blocks=r"stages\.\d+")
    assert s.block_paths == ("stages.0", "stages.1", "stages.2")
    assert s.embeddings == ("stem.weight",) and s.head == ("out.weight", "out.bias") and s.top == ()
    assert model_structure(model, head="o.t", blocks=["stages.0", "stages.1"]).top == ("stages.2.weight", "stages.2.bias")


def test_blocks_by_module_list_path():
    model = minilm()
    s = model_structure(model, blocks="bert.encoder.layer")
    assert len(s.blocks) == 6


@pytest.mark.parametrize("kwargs, match", [
    ({"head": ["nonexistent"]}, "head name 'nonexistent' matches no module"),
    ({"blocks": "nothing_here"}, "blocks='nothing_here' matches no module"),
    ({"head": "(unclosed"}, "not a valid regular expression"),
    ({"blocks": ["bert.encoder.layer.0.attention.self.dropout"]}, "holds no parameters"),
])
def test_bad_overrides_are_named(kwargs, match):
    with pytest.raises(TargetError, match=match):
        model_structure(minilm(), **kwargs)


def test_structure_does_not_change_the_model():
    model = minilm()
    before = {n: (p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()}
    model_structure(model)
    assert {n: (p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()} == before
    assert torch.is_grad_enabled()
