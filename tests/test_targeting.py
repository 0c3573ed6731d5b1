"""Target selection: names, suffixes, regex, all-linear, callables, layers=, exclude."""

import pytest
from torch import nn

from models import gpt2, llama, minilm
from peftcore import targeting
from peftcore.errors import TargetError


def _linear_like(module):
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _select(model, **spec):
    return targeting.select(model, targeting.TargetSpec(**spec), default=None, is_linear_like=_linear_like)


def test_suffix_matches_whole_components_only():
    model = minilm()
    paths = _select(model, targets=["query"])
    assert paths == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(6)]
    assert _select(model, targets=["self.query"]) == paths
    with pytest.raises(TargetError, match="'uery' matches no module"):
        _select(model, targets=["uery"])


def test_exact_path_and_order_follow_the_model():
    model = minilm()
    paths = _select(model, targets=["bert.encoder.layer.3.attention.self.value", "bert.encoder.layer.1.output.dense"])
    assert paths == ["bert.encoder.layer.1.output.dense", "bert.encoder.layer.3.attention.self.value"]


def test_regex_is_a_full_match():
    model = llama()
    assert _select(model, targets=r".*\.(q|v)_proj") == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"
    ]
    with pytest.raises(TargetError, match="matches no module"):
        _select(model, targets=r"q_proj")  # not a full match of any path
    with pytest.raises(TargetError, match="not a valid regular expression"):
        _select(model, targets=r"(unclosed")


def test_all_linear_skips_the_output_head():
    model = gpt2()
    paths = _select(model, targets="all-linear")
    assert "lm_head" not in paths and "transformer.h.0.attn.c_attn" in paths
    bert = minilm()
    assert "classifier" not in _select(bert, targets="all-linear")


def test_callable_and_its_errors():
    model = llama()
    paths = _select(model, targets=lambda name, module: name.endswith("gate_proj"))
    assert paths == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]

    def broken(name, module):
        raise KeyError("bug")

    with pytest.raises(TargetError, match="callable raised on module"):
        _select(model, targets=broken)


def test_layers_keeps_block_indices_and_negative_counts_from_end():
    model = minilm()
    assert _select(model, targets=["query"], layers=[0, -1]) == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.5.attention.self.query"]
    assert _select(model, targets=["query"], layers=2) == ["bert.encoder.layer.2.attention.self.query"]
    with pytest.raises(TargetError, match="block 6 does not exist; the model has blocks 0..5"):
        _select(model, targets=["query"], layers=[6])
    with pytest.raises(TargetError, match="takes an int or a list of ints"):
        _select(model, targets=["query"], layers=["1"])


def test_exclude_removes_containers_and_leaves():
    model = minilm()
    paths = _select(model, targets=["query", "value"], exclude=["bert.encoder.layer.0", "value"])
    assert paths == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(1, 6)]
    with pytest.raises(TargetError, match="removes every target"):
        _select(model, targets=["query"], exclude=["query"])


def test_bad_selection_types():
    model = minilm()
    with pytest.raises(TargetError, match="cannot select modules with 3"):
        _select(model, targets=3)
    with pytest.raises(TargetError, match="only strings"):
        _select(model, targets=["query", 3])


def test_error_lists_real_module_names():
    with pytest.raises(TargetError) as info:
        _select(llama(), targets=["qproj"])
    message = str(info.value)
    assert "model.embed_tokens" in message and "q_proj" in message


def test_block_index():
    assert targeting.block_index("bert.encoder.layer.11.attention.self.query") == 11
    assert targeting.block_index("transformer.h.0.attn") == 0
    assert targeting.block_index("classifier") is None
