"""IA3 in HF PEFT's format, both ways, against the real ``peft`` package: outputs compared in fp32."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import peftcore
from peftcore import lifecycle
from models import gpt2, llama, minilm, minilm_inputs, output_of, token_inputs
from peftcore.errors import CheckpointError
from peft_dirs import load_peft_dir, read_dir, save_native, save_peft_dir
from peftcore.formats import peft_ia3

peft = pytest.importorskip("peft")
pytest.importorskip("peftcore_ia3")

DECODERS = {"gpt2": gpt2, "llama": llama}
TOL = {"rtol": 0, "atol": 1e-5}


def peft_outputs(base, directory: Path, inputs: dict) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    with torch.no_grad():
        return model(**inputs).logits


def peft_ia3_dir(base, directory: Path, **options) -> Path:
    """A PEFT IA3 adapter with random vectors (init_ia3_weights=False), saved by PEFT."""
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False, **options))
        model.save_pretrained(str(directory))
    return directory


def _perturb_ia3(model) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


# -- PEFT -> peftcore ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_to_peftcore_same_outputs(family, tmp_path):
    base = DECODERS[family]()
    directory = peft_ia3_dir(base, tmp_path / "peft", task_type="CAUSAL_LM")
    inputs = token_inputs()
    expected = peft_outputs(base, directory, inputs)
    model = load_peft_dir(copy.deepcopy(base), directory, tmp_path)
    torch.testing.assert_close(output_of(model, inputs), expected, **TOL)
    assert not torch.allclose(output_of(base, inputs), expected, atol=1e-3)  # the adapter does something
    record = peftcore.adapters(model)["default"]
    assert record.method == "ia3"
    if family == "gpt2":  # PEFT scales all of c_attn, query included
        assert record.config.scale_packed_query
        assert model.transformer.h[0].attn.c_attn.ia3_l["default"].shape == (96,)
        assert sorted(record.config.feedforward) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    else:
        assert not record.config.scale_packed_query
        assert sorted(record.config.feedforward) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_peft_to_peftcore_regex_targets_and_feedforward(tmp_path):
    base = llama()
    directory = peft_ia3_dir(base, tmp_path / "peft", task_type="CAUSAL_LM", target_modules=r".*\.(v_proj|up_proj)",
                             feedforward_modules=r".*\.up_proj")
    inputs = token_inputs()
    model = load_peft_dir(copy.deepcopy(base), directory, tmp_path)
    torch.testing.assert_close(output_of(model, inputs), peft_outputs(base, directory, inputs), **TOL)
    assert sorted(lifecycle.get_state(model).adapters["default"].targets) == [
        "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_minilm_sequence_classification_with_the_classifier_in_modules_to_save(tmp_path):
    base = minilm()
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="SEQ_CLS", init_ia3_weights=False))
        with torch.no_grad():
            trained.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)  # a head that was trained
        trained.save_pretrained(str(tmp_path / "peft"))
    inputs = minilm_inputs()
    expected = peft_outputs(base, tmp_path / "peft", inputs)
    model = load_peft_dir(copy.deepcopy(base), tmp_path / "peft", tmp_path)
    torch.testing.assert_close(output_of(model, inputs), expected, **TOL)
    assert lifecycle.get_state(model).adapters["default"].trainable == ["classifier"]


# -- peftcore -> PEFT, and back -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peftcore_to_peft_and_back_same_outputs(family, tmp_path):
    base = DECODERS[family]()
    model = peftcore.wrap(copy.deepcopy(base), "ia3")  # GPT-2: key and value thirds of c_attn only
    _perturb_ia3(model)
    inputs = token_inputs()
    ours = output_of(model, inputs)
    directory = save_peft_dir(model, tmp_path / "peft", tmp_path)
    config, tensors = read_dir(directory)
    assert config["peft_type"] == "IA3" and config["task_type"] == "CAUSAL_LM"
    assert all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in tensors)
    torch.testing.assert_close(peft_outputs(base, directory, inputs), ours, **TOL)

    again = load_peft_dir(copy.deepcopy(base), directory, tmp_path / "again")
    torch.testing.assert_close(output_of(again, inputs), ours, **TOL)


def test_peftcore_to_peft_with_a_trainable_head(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_labels=3, pad_token_id=0)).eval()
    model = peftcore.wrap(copy.deepcopy(base), "ia3", trainable=["score"])
    _perturb_ia3(model)
    with torch.no_grad():
        model.score.weight.mul_(2.0)
    inputs = token_inputs()
    ours = output_of(model, inputs)
    directory = save_peft_dir(model, tmp_path / "peft", tmp_path)
    config, tensors = read_dir(directory)
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert "base_model.model.score.weight" in tensors
    torch.testing.assert_close(peft_outputs(base, directory, inputs), ours, **TOL)
    again = load_peft_dir(copy.deepcopy(base), directory, tmp_path / "again")
    torch.testing.assert_close(output_of(again, inputs), ours, **TOL)


# -- what is refused ------------------------------------------------------------------------------------
def test_unknown_options_and_misfits_are_refused_without_touching_the_model(tmp_path):
    base = gpt2()
    config, tensors = read_dir(peft_ia3_dir(base, tmp_path / "peft", task_type="CAUSAL_LM"))
    keys = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"sets 'use_magic' = True, which peftcore does not implement.*target_modules"):
        peft_ia3.to_native(base, {**config, "use_magic": True}, tensors, "src")
    bad = dict(tensors)
    bad["base_model.model.transformer.h.0.attn.c_attn.ia3_l"] = torch.ones(5, 1)
    with pytest.raises(CheckpointError, match=r"shape \(5, 1\).*takes \(96, 1\).*or \(1, 32\)"):
        peft_ia3.to_native(base, config, bad, "src")
    with pytest.raises(CheckpointError, match="feedforward_modules=.*excludes 'transformer.h.0.mlp.c_proj'"):
        peft_ia3.to_native(base, {**config, "feedforward_modules": ["nothing"]}, tensors, "src")
    with pytest.raises(CheckpointError, match="neither an adapter tensor nor a weight of a module in modules_to_save"):
        peft_ia3.to_native(base, config, {**tensors, "base_model.model.lm_head.weight": torch.zeros(128, 32)}, "src")
    assert not peftcore.adapters(base)
    assert all(torch.equal(v, keys[k]) for k, v in base.state_dict().items())


def test_without_a_model_the_same_conversion_or_a_clear_error(tmp_path):
    """``peftcore convert`` has no model: the keys and shapes say what the model would."""
    for make in (gpt2, llama):
        base = make()
        config, tensors = read_dir(peft_ia3_dir(base, tmp_path / make.__name__, task_type="CAUSAL_LM"))
        with_model, with_model_tensors = peft_ia3.to_native(base, config, tensors, "src")
        without, without_tensors = peft_ia3.to_native(None, config, tensors, "src")
        assert without == with_model and without_tensors.keys() == with_model_tensors.keys()
    model = peftcore.wrap(llama(), "ia3")
    native = save_native(model, tmp_path / "native")
    config, tensors = read_dir(native)
    written, written_tensors = peft_ia3.from_native(None, config, tensors)
    expected, expected_tensors = peft_ia3.from_native(model, config, tensors)
    assert written == expected and all(torch.equal(written_tensors[k], v) for k, v in expected_tensors.items())
    gpt2_native = save_native(peftcore.wrap(gpt2(), "ia3"), tmp_path / "gpt2-native")
    with pytest.raises(CheckpointError, match="'transformer.h.0.attn.c_attn'.*needs the model.*query third"):
        peft_ia3.from_native(None, *read_dir(gpt2_native))
