"""Prompt and prefix tuning in HF PEFT's format, both ways, against the real ``peft`` package.

PEFT's causal LMs return logits for the virtual tokens too under prompt tuning (V + T
positions) and for the real tokens only under prefix tuning; peftcore returns the same shapes,
so whole logits are compared, with and without left padding.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import peftcore
from models import gpt2, llama, minilm, minilm_inputs, output_of, perturb, token_inputs
from peftcore import lifecycle
from peftcore.errors import CheckpointError
from peft_dirs import load_peft_dir, read_dir, save_native, save_peft_dir
from peftcore.formats import peft_prompt

peft = pytest.importorskip("peft")

DECODERS = {"gpt2": gpt2, "llama": llama}
TOL = {"rtol": 0, "atol": 1e-5}
PADDED = {"input_ids": token_inputs()["input_ids"], "attention_mask": torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])}
CASES = {"plain": token_inputs(), "left-padded": PADDED, "no mask": {"input_ids": token_inputs()["input_ids"]}}


def peft_model(base, directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def peft_dir(base, directory: Path, config) -> Path:
    """A PEFT adapter with its random initial weights (prompt and prefix tuning start from N(0, 1)), saved by PEFT."""
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(directory))
    return directory


def assert_same_outputs(ours, theirs, cases=CASES) -> None:
    for name, inputs in cases.items():
        with torch.no_grad():
            expected = theirs(**inputs).logits
        got = output_of(ours, inputs)
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{name}: {m}")


PEFT_CONFIGS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix-projection": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                         prefix_projection=True, encoder_hidden_size=24),
}


# -- PEFT -> peftcore ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_to_peftcore_same_outputs(family, kind, tmp_path):
    base = DECODERS[family]()
    directory = peft_dir(base, tmp_path / "peft", PEFT_CONFIGS[kind]())
    model = load_peft_dir(copy.deepcopy(base), directory, tmp_path)
    assert_same_outputs(model, peft_model(base, directory))
    record = lifecycle.get_state(model).adapters["default"]
    if kind == "prompt":
        assert record.method == "prompt" and record.config.virtual_tokens == 3
    else:
        assert record.method == "prefix" and record.config.shift_positions
        assert record.config.projection == (24 if kind == "prefix-projection" else None)
        # Llama: 2 key/value heads of 8 (grouped-query attention), not 4 query heads
        assert model.peftcore_prefix.adapters["default"].shape == ((2, 2, 3, 8) if family == "llama" else (2, 4, 3, 8))


def _greedy_by_forward(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generate_of_a_loaded_adapter_equals_greedy_decoding_by_peft_forward(kind, tmp_path):
    # by PEFT's forward, not PEFT's generate: under transformers 5.24, PEFT 0.21.2's generate differs from
    # greedy decoding by its own forward (prompt tuning on GPT-2 and Llama, prefix tuning on Llama)
    base = llama()
    directory = peft_dir(base, tmp_path / "peft", PEFT_CONFIGS[kind]())
    model = load_peft_dir(copy.deepcopy(base), directory, tmp_path)
    ids = token_inputs()["input_ids"][:, :4]
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, _greedy_by_forward(peft_model(base, directory), ids, 6))


def test_minilm_prompt_sequence_classification_with_the_classifier_in_modules_to_save(tmp_path):
    # prompt, not prefix, tuning: PEFT's own prefix tuning fails on BertForSequenceClassification under
    # transformers 5.24 (it looks for a past_key_values parameter that BertModel.forward now calls cache)
    base = minilm()
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
        with torch.no_grad():
            trained.base_model.classifier.modules_to_save["default"].weight.mul_(3.0)  # a head that was trained
        trained.save_pretrained(str(tmp_path / "peft"))
    inputs = minilm_inputs()  # padded (the sentences differ in length), with token_type_ids
    model = load_peft_dir(copy.deepcopy(base), tmp_path / "peft", tmp_path)
    assert_same_outputs(model, peft_model(base, tmp_path / "peft"), {"minilm": inputs})
    assert lifecycle.get_state(model).adapters["default"].trainable == ["classifier"]
    assert not torch.allclose(output_of(base, inputs), output_of(model, inputs), atol=1e-3)


# -- peftcore -> PEFT, and back -------------------------------------------------------------------------
NATIVE = {
    "prompt": ("prompt", {"virtual_tokens": 3}),
    "prefix": ("prefix", {"virtual_tokens": 3, "shift_positions": True}),
    "prefix-projection": ("prefix", {"virtual_tokens": 3, "shift_positions": True, "projection": 24}),
}


@pytest.mark.parametrize("kind", list(NATIVE))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peftcore_to_peft_and_back_same_outputs(family, kind, tmp_path):
    base = DECODERS[family]()
    method, options = NATIVE[kind]
    model = peftcore.wrap(copy.deepcopy(base), method, **options)
    perturb(getattr(model, f"peftcore_{method}"), scale=1.0)
    directory = save_peft_dir(model, tmp_path / "peft", tmp_path)
    config, tensors = read_dir(directory)
    assert config["peft_type"] == ("PROMPT_TUNING" if method == "prompt" else "PREFIX_TUNING")
    assert config["task_type"] == "CAUSAL_LM" and list(tensors) == ["prompt_embeddings"]
    if method == "prefix":
        assert config["prefix_projection"] == (kind == "prefix-projection")
        assert config["num_attention_heads"] == (2 if family == "llama" else 4)  # key/value heads
    assert_same_outputs(peft_model(base, directory), model)

    again = load_peft_dir(copy.deepcopy(base), directory, tmp_path / "again")
    assert_same_outputs(again, model)


def test_peftcore_prompt_on_a_classifier_with_a_trainable_head_to_peft(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_labels=3, pad_token_id=0)).eval()
    model = peftcore.wrap(copy.deepcopy(base), "prompt", virtual_tokens=4, trainable=["score"])
    perturb(model.peftcore_prompt, scale=1.0)
    with torch.no_grad():
        model.score.weight.mul_(2.0)
    directory = save_peft_dir(model, tmp_path / "peft", tmp_path)
    config, tensors = read_dir(directory)
    assert config["task_type"] == "SEQ_CLS" and sorted(tensors) == ["base_model.score.weight", "prompt_embeddings"]
    assert_same_outputs(peft_model(base, directory), model, {"plain": token_inputs()})
    again = load_peft_dir(copy.deepcopy(base), directory, tmp_path / "again")
    assert_same_outputs(again, model, {"plain": token_inputs()})


def test_a_prefix_with_unshifted_positions_differs_from_peft_and_is_not_written(tmp_path):
    """peftcore's default keeps the real tokens at 0..T-1; PEFT always puts them behind the prefix."""
    base = gpt2()
    shifted = peftcore.wrap(copy.deepcopy(base), "prefix", virtual_tokens=3, shift_positions=True)
    perturb(shifted.peftcore_prefix, scale=1.0)
    unshifted = peftcore.wrap(copy.deepcopy(base), "prefix", virtual_tokens=3)
    unshifted.peftcore_prefix.load_state_dict(shifted.peftcore_prefix.state_dict())
    inputs = token_inputs()
    assert not torch.allclose(output_of(shifted, inputs), output_of(unshifted, inputs), atol=1e-3)
    with pytest.raises(CheckpointError, match="shift_positions=False.*always puts them behind the prefix.*format='peftcore'"):
        save_peft_dir(unshifted, tmp_path / "peft", tmp_path)


# -- what is refused ------------------------------------------------------------------------------------
def test_unsupported_options_and_misfits_are_refused_without_touching_the_model(tmp_path):
    base = llama()
    config, tensors = read_dir(peft_dir(base, tmp_path / "peft", PEFT_CONFIGS["prefix"]()))
    keys = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match="task_type 'SEQ_2_SEQ_LM' is not supported.*CAUSAL_LM, SEQ_CLS"):
        peft_prompt.to_native(base, {**config, "task_type": "SEQ_2_SEQ_LM"}, tensors, "src")
    with pytest.raises(CheckpointError, match="num_transformer_submodules=2 is not supported"):
        peft_prompt.to_native(base, {**config, "num_transformer_submodules": 2}, tensors, "src")
    with pytest.raises(CheckpointError, match=r"num_attention_heads=4 \(the model has 2\).*grouped-query"):
        peft_prompt.to_native(base, {**config, "num_attention_heads": 4}, tensors, "src")
    with pytest.raises(CheckpointError, match=r"sets 'use_magic' = 1, which peftcore does not implement.*prefix_projection"):
        peft_prompt.to_native(base, {**config, "use_magic": 1}, tensors, "src")
    with pytest.raises(CheckpointError, match=r"prompt_embeddings has shape \(3, 63\).*\(3, 64\)"):
        peft_prompt.to_native(base, config, {"prompt_embeddings": torch.zeros(3, 63)}, "src")
    with pytest.raises(CheckpointError, match="neither PROMPT_TUNING nor PREFIX_TUNING"):
        peft_prompt.to_native(base, {**config, "peft_type": "P_TUNING"}, tensors, "src")
    prompt_config = {k: v for k, v in config.items() if k not in ("encoder_hidden_size", "prefix_projection", "init_weights")}
    prompt_config.update(peft_type="PROMPT_TUNING", prompt_tuning_init="RANDOM")
    with pytest.raises(CheckpointError, match=r"prompt_embeddings has shape \(3, 64\).*make \(3, 32\)"):
        peft_prompt.to_native(base, prompt_config, tensors, "src")
    assert not peftcore.adapters(base)
    assert all(torch.equal(v, keys[k]) for k, v in base.state_dict().items())


def test_the_initialisation_is_recorded_without_needing_a_tokenizer():
    base = gpt2()
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2, "token_dim": 32,
              "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hello", "tokenizer_name_or_path": "no/such/tok"}
    native, tensors = peft_prompt.to_native(base, config, {"prompt_embeddings": torch.ones(2, 32)}, "src")
    assert native["options"] == {"virtual_tokens": 2, "init": "vocab"}  # the saved embeddings replace any init
    assert native["targets"] == ["transformer.wte"] and list(tensors) == ["peftcore_prompt.embeddings"]
    model = peftcore.wrap(gpt2(), "prompt", virtual_tokens=2, init="random")
    written, _ = peft_prompt.from_native(model, {"method": "prompt", "options": {"virtual_tokens": 2, "init": "random"},
                                                 "targets": ["transformer.wte"]}, {"peftcore_prompt.embeddings": torch.ones(2, 32)})
    assert written["prompt_tuning_init"] == "RANDOM" and written["token_dim"] == 32
    text = {"virtual_tokens": 2, "init": "a text", "tokenizer": "/tok", "init_ids": [1, 2]}
    written, _ = peft_prompt.from_native(model, {"method": "prompt", "options": text, "targets": ["transformer.wte"]},
                                         {"peftcore_prompt.embeddings": torch.ones(2, 32)})
    assert (written["prompt_tuning_init"], written["prompt_tuning_init_text"], written["tokenizer_name_or_path"]) == (
        "TEXT", "a text", "/tok")


@pytest.mark.parametrize("kind", list(NATIVE))
def test_writing_needs_no_model_and_reading_names_why_it_does(kind, tmp_path):
    method, options = NATIVE[kind]
    model = peftcore.wrap(llama(), method, **options)
    config, tensors = read_dir(save_native(model, tmp_path / "native"))
    written, written_tensors = peft_prompt.from_native(None, config, tensors)
    expected, expected_tensors = peft_prompt.from_native(model, config, tensors)
    if method == "prompt":  # PEFT fills these in from the model when they are None
        expected.update(num_layers=None, num_attention_heads=None)
    assert written == expected and torch.equal(written_tensors["prompt_embeddings"], expected_tensors["prompt_embeddings"])
    with pytest.raises(CheckpointError, match="needs the base model.*peftcore.load"):
        peft_prompt.to_native(None, written, written_tensors, "src")
