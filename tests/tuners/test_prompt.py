"""Prompt tuning: against the base model fed the virtual embeddings by hand, generate, the lifecycle, errors."""

import copy
import json
import pickle

import pytest
import torch
from torch import nn

import peftcore
from models import (
    FAMILIES, all_hooks, assert_a_failed_wrap_leaves_no_trace, assert_training_lowers_the_loss, gpt2,
    greedy_by_forward, llama, minilm, minilm_inputs, minilm_tokenizer, mlp, output_of, perturb, token_inputs,
)
from peftcore.tuners.prefix import calls
from peftcore.tuners.prompt import PromptConfig

DECODERS = {"gpt2": gpt2, "llama": llama}


def _prompt(model, name="default") -> nn.Parameter:
    return model.peftcore_prompt.embeddings[name]


def _by_hand(model, inputs, prompt):
    """The model (prompt switched off) given the virtual embeddings in front of the input embeddings."""
    batch, tokens = inputs["input_ids"].shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.expand(batch, -1, -1), model.get_input_embeddings()(inputs["input_ids"])], dim=1)
    call = {"inputs_embeds": embeds,
            "attention_mask": torch.cat([torch.ones(batch, tokens, dtype=torch.long), inputs["attention_mask"]], dim=1)}
    if "token_type_ids" in inputs:
        call["token_type_ids"] = torch.cat([torch.zeros(batch, tokens, dtype=torch.long), inputs["token_type_ids"]], dim=1)
    with peftcore.disabled(model), torch.no_grad():
        return model(**call).logits


# -- meaning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])  # MiniLM: test_position_and_token_type_ids_...
def test_prompt_equals_virtual_embeddings_put_in_front_by_hand(family):
    factory, make_inputs = FAMILIES[family]
    model, inputs = factory(), make_inputs()
    peftcore.wrap(model, "prompt", virtual_tokens=3)
    perturb(model.peftcore_prompt, scale=0.05)
    got = output_of(model, inputs)
    torch.testing.assert_close(got, _by_hand(model, inputs, _prompt(model).detach()), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 3 + 7, 128)  # token-level outputs: V virtual positions in front


def test_language_model_labels_ignore_the_virtual_positions():
    model, inputs = gpt2(), token_inputs()
    peftcore.wrap(model, "prompt", virtual_tokens=4)
    perturb(model.peftcore_prompt)
    labels = inputs["input_ids"].clone()
    labels[0, 2] = -100
    out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == 4 + 7
    # position t predicts token t+1: the last virtual position predicts the first real token
    predicted, target = out.logits[:, 3:-1], labels
    expected = nn.functional.cross_entropy(predicted.reshape(-1, 128), target.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_position_and_token_type_ids_follow_the_virtual_tokens():
    model, inputs = minilm(), minilm_inputs()
    peftcore.wrap(model, "prompt", virtual_tokens=2)
    perturb(model.peftcore_prompt, scale=0.05)
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(2, -1)
    # explicit positions 0..T-1 for the real tokens become V..V+T-1, as the model counts them itself
    torch.testing.assert_close(output_of(model, {**inputs, "position_ids": positions}), output_of(model, inputs), rtol=1e-5, atol=1e-6)
    types = inputs["token_type_ids"].clone()
    types[:, 3:] = 1
    batch = 2
    embeds = torch.cat([_prompt(model).detach().expand(batch, -1, -1), model.get_input_embeddings()(inputs["input_ids"])], 1)
    with peftcore.disabled(model), torch.no_grad():
        expected = model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(batch, 2, dtype=torch.long), inputs["attention_mask"]], 1),
                         token_type_ids=torch.cat([torch.zeros(batch, 2, dtype=torch.long), types], 1)).logits
    torch.testing.assert_close(output_of(model, {**inputs, "token_type_ids": types}), expected, rtol=1e-5, atol=1e-6)


# -- init ------------------------------------------------------------------------------------------------
def test_inits():
    model = gpt2()
    weight = model.get_input_embeddings().weight
    peftcore.wrap(model, "prompt", name="v", virtual_tokens=6, init="vocab")
    rows = _prompt(model, "v")
    assert all(any(torch.equal(r, w) for w in weight) for r in rows)
    peftcore.wrap(model, "prompt", name="r", virtual_tokens=400, init="random")
    rnd = _prompt(model, "r")
    assert abs(rnd.std().item() - weight.std().item()) < 0.1 * weight.std().item()
    assert not any(torch.equal(rnd[0], w) for w in weight)


def test_text_init_takes_the_text_tokens_and_finds_the_tokenizer():
    tokenizer = minilm_tokenizer()
    ids = tokenizer("sports and weather", add_special_tokens=False)["input_ids"]
    model = minilm()
    peftcore.wrap(model, "prompt", virtual_tokens=5, init="sports and weather")  # tokenizer from model.name_or_path
    weight = model.get_input_embeddings().weight
    cycled = (ids * 2)[:5]
    torch.testing.assert_close(_prompt(model).detach(), weight[cycled])
    config = model._peftcore.adapters["default"].config
    assert config.init_ids == ids and config.tokenizer == model.name_or_path
    given = PromptConfig(virtual_tokens=2, init="sports and weather", tokenizer=tokenizer)
    assert given.init_ids == ids and given.tokenizer == tokenizer.name_or_path


def test_text_init_without_a_tokenizer_is_a_clear_error():
    model = gpt2()  # built from a config: no directory to find a tokenizer in
    with pytest.raises(peftcore.ConfigError, match="needs a tokenizer: pass tokenizer="):
        peftcore.wrap(model, "prompt", init="hello there")
    assert not hasattr(model, "peftcore_prompt") and not all_hooks(model)
    with pytest.raises(peftcore.ConfigError, match="outside the model's vocabulary of 128"):
        peftcore.wrap(model, "prompt", init="hello there", tokenizer=minilm_tokenizer())


# -- generate and caches ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family, with_prefix", [("gpt2", False), ("llama", False), ("llama", True)])
def test_greedy_generate_equals_step_by_step_forward(family, with_prefix):
    model = DECODERS[family]()
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    ids[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    with torch.no_grad():
        base = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    names = ["prompt"]
    if with_prefix:  # both methods at once: the prompt's tokens go in front, the prefix before them in the cache
        peftcore.wrap(model, "prefix", name="prefix", virtual_tokens=2, init="random")
        names.append("prefix")
    peftcore.wrap(model, "prompt", name="prompt", virtual_tokens=3)
    perturb(model.peftcore_prompt, scale=1.0)
    peftcore.activate(model, names)
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_by_forward(model, ids, mask, 6))
    assert not torch.equal(generated, base)


def test_a_returned_cache_continues_and_is_checked():
    model = gpt2()
    peftcore.wrap(model, "prompt", virtual_tokens=3)
    perturb(model.peftcore_prompt)
    ids = token_inputs(length=8)["input_ids"]
    name = calls.cache_argument(model)  # "cache" (transformers >= 5.24) or "past_key_values"
    with torch.no_grad():
        full = model(ids).logits
        first = calls.output_cache(model(ids[:, :5]))  # the model makes the cache; the prompt marks it
        rest = model(ids[:, 5:], **{name: first}).logits
    torch.testing.assert_close(rest, full[:, 3 + 5:], rtol=1e-5, atol=1e-5)
    with peftcore.disabled(model), pytest.raises(peftcore.AdapterStateError, match="virtual tokens of prompt adapter"):
        model(ids[:, 5:], **{name: first})


# -- lifecycle ---------------------------------------------------------------------------------------------
# the conformance kit (below) also saves and loads on tiny BERT, GPT-2 and Llama
@pytest.mark.parametrize("family", ["minilm", "llama"])
def test_save_load_reproduces_outputs_and_unwrap_restores_the_base(family, tmp_path):
    factory, make_inputs = FAMILIES[family]
    model, inputs = factory(), make_inputs()
    base_out, base_keys = output_of(model, inputs), set(model.state_dict())
    init = "sports and weather" if family == "minilm" else "vocab"
    peftcore.wrap(model, "prompt", virtual_tokens=4, init=init)
    perturb(model.peftcore_prompt, scale=0.05)
    adapted = output_of(model, inputs)
    with peftcore.disabled(model):
        torch.testing.assert_close(output_of(model, inputs), base_out, rtol=0, atol=0)
    summary = peftcore.summary(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    assert summary.adapters[0].adapter_params == 4 * hidden == summary.trainable
    peftcore.save(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["targets"] == [{"minilm": "bert.embeddings.word_embeddings", "gpt2": "transformer.wte",
                                 "llama": "model.embed_tokens"}[family]]
    fresh = factory()
    peftcore.load(fresh, tmp_path / "a")
    torch.testing.assert_close(output_of(fresh, inputs), adapted, rtol=0, atol=0)
    peftcore.unwrap(model)
    assert not hasattr(model, "peftcore_prompt") and not all_hooks(model)
    assert set(model.state_dict()) == base_keys
    torch.testing.assert_close(output_of(model, inputs), base_out, rtol=0, atol=0)


def test_several_named_adapters_one_active_at_a_time():
    model, inputs = llama(), token_inputs()
    peftcore.wrap(model, "prompt", name="a", virtual_tokens=2)
    out_a = output_of(model, inputs)
    peftcore.wrap(model, "prompt", name="b", virtual_tokens=2)
    out_b = output_of(model, inputs)
    assert not torch.allclose(out_a, out_b)
    peftcore.activate(model, "a")
    torch.testing.assert_close(output_of(model, inputs), out_a, rtol=0, atol=0)
    with pytest.raises(peftcore.AdapterStateError, match="only one prompt adapter can be active"):
        peftcore.activate(model, ["a", "b"])
    torch.testing.assert_close(output_of(model, inputs), out_a, rtol=0, atol=0)
    with pytest.raises(peftcore.AdapterStateError, match="cannot be merged"):
        peftcore.unwrap(model, merge=True)


def test_lora_and_prompt_together():
    model, inputs = gpt2(), token_inputs()
    peftcore.wrap(model, "lora", name="lora", rank=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peftcore.wrap(model, "prompt", name="prompt", virtual_tokens=3)
    peftcore.activate(model, ["lora", "prompt"])
    got = output_of(model, inputs)
    trainable = {n.split(".")[-2] if "lora_" in n else n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "peftcore_prompt"}
    peftcore.activate(model, "lora")
    batch = 2
    embeds = torch.cat([_prompt(model, "prompt").detach().expand(batch, -1, -1), model.get_input_embeddings()(inputs["input_ids"])], 1)
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(batch, 3, dtype=torch.long), inputs["attention_mask"]], 1)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with peftcore.disabled(model):
        lora_off = output_of(model, inputs)
    assert not torch.allclose(lora_off, output_of(model, inputs))  # LoRA does act


def test_deepcopy_and_pickle_keep_the_prompt_working():
    model, inputs = llama(), token_inputs()
    peftcore.wrap(model, "prompt", virtual_tokens=3)
    expected = output_of(model, inputs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(output_of(clone, inputs), expected, rtol=0, atol=0)
        peftcore.unwrap(clone)
        assert not all_hooks(clone)
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_few_steps_lower_the_loss(family):
    factory, make_inputs = FAMILIES[family]
    model, inputs = factory(), make_inputs()
    labels = torch.tensor([0, 2]) if family == "minilm" else inputs["input_ids"]
    peftcore.wrap(model, "prompt", virtual_tokens=4)
    assert_training_lowers_the_loss(model, inputs, labels)


# -- errors -------------------------------------------------------------------------------------------------
def test_models_without_inputs_embeds_and_target_options_are_refused():
    with pytest.raises(peftcore.UnsupportedModuleError, match="transformers models"):
        peftcore.wrap(mlp(), "prompt")
    with pytest.raises(peftcore.TargetError, match="no targets"):
        peftcore.wrap(gpt2(), "prompt", targets=["transformer.wte"])


def test_a_failed_wrap_leaves_no_hook(monkeypatch):
    assert_a_failed_wrap_leaves_no_trace(monkeypatch, "prompt")


def test_a_prepared_4d_mask_and_a_fixed_size_cache_are_refused():
    model, inputs = llama(), token_inputs()
    peftcore.wrap(model, "prompt", virtual_tokens=2)
    with pytest.raises(peftcore.ConfigError, match="2D attention mask"):
        model(inputs["input_ids"], attention_mask=torch.ones(2, 1, 7, 7))
    with pytest.raises(peftcore.ConfigError, match="fixed-size StaticCache has no room"):
        model.generate(inputs["input_ids"], max_new_tokens=2, cache_implementation="static", pad_token_id=0)


def test_config_validation():
    assert PromptConfig().virtual_tokens == 20 and PromptConfig().init == "vocab"
    for bad in ({"virtual_tokens": 0}, {"init": ""}, {"init": 3}, {"init_ids": []}, {"init_ids": [1, -2]}):
        with pytest.raises(peftcore.ConfigError):
            PromptConfig(**bad)


# -- conformance kit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_conformance_kit(family):
    from peftcore.testing import check_method, tiny_model

    report = check_method("prompt", lambda: tiny_model(family), virtual_tokens=4)
    assert set(report.passed) == {"training_mode", "disable", "save_load", "merge", "gradients", "unwrap", "dtype"}
    assert "identity_at_init" in report.skipped
