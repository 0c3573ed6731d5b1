"""wrap / activate / merge / disabled / delete / unwrap on real transformers models and plain modules."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import peftcore
from models import FAMILIES, gpt2, minilm, mlp, output_of


def _family(name):
    factory, inputs = FAMILIES[name]
    return factory(), inputs()


def _perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", ["minilm", "gpt2", "llama"])
def test_wrap_defaults_equal_base_at_init_and_keep_object(family):
    model, inputs = _family(family)
    before = output_of(model, inputs)
    cls = type(model)
    returned = peftcore.wrap(model, "lora", rank=8)
    assert returned is model and type(model) is cls
    torch.testing.assert_close(output_of(model, inputs), before, rtol=0, atol=0)
    wrapped = [n for n, m in model.named_modules() if type(m).__name__.startswith("Lora")]
    assert wrapped, "default targets must find linear-like layers"
    # the output head is never a default target
    assert not any(part in {"classifier", "lm_head", "score"} for n in wrapped for part in n.split("."))


def test_default_targets_on_minilm_are_all_linear_but_head():
    model = minilm()
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("classifier")]
    peftcore.wrap(model, "lora")
    state = model._peftcore.adapters["default"]
    assert state.targets == linear
    assert "bert.pooler.dense" in state.targets and "classifier" not in state.targets


def test_gpt2_conv1d_is_targeted_and_lm_head_is_not():
    model = gpt2()
    peftcore.wrap(model, "lora", rank=4)
    targets = model._peftcore.adapters["default"].targets
    assert "transformer.h.0.attn.c_attn" in targets and "transformer.h.1.mlp.c_proj" in targets
    assert "lm_head" not in targets


@pytest.mark.parametrize("family", ["minilm", "gpt2", "llama"])
def test_training_changes_only_adapter_parameters(family):
    model, inputs = _family(family)
    trainable = ["classifier"] if family == "minilm" else None
    peftcore.wrap(model, "lora", rank=4, trainable=trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**inputs).logits.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    allowed = {n for n, p in model.named_parameters() if "lora_" in n or (trainable and n.startswith("classifier."))}
    assert changed and changed <= allowed
    assert any("lora_B" in n for n in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == allowed


def test_frozen_base_and_trainable_head():
    model = minilm()
    peftcore.wrap(model, "lora", trainable=["classifier"])
    for name, param in model.named_parameters():
        expected = "lora_" in name or name.startswith("classifier.")
        assert param.requires_grad == expected, name


@pytest.mark.parametrize("family", ["minilm", "gpt2", "llama"])
def test_merge_matches_unmerged_and_unmerge_restores(family):
    model, inputs = _family(family)
    peftcore.wrap(model, "lora", rank=4)
    _perturb_adapters(model)
    unmerged = output_of(model, inputs)
    peftcore.merge(model)
    assert peftcore.adapters(model)["default"].merged
    torch.testing.assert_close(output_of(model, inputs), unmerged, rtol=1e-5, atol=1e-5)
    peftcore.unmerge(model)
    torch.testing.assert_close(output_of(model, inputs), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["minilm", "gpt2", "llama"])
def test_unwrap_restores_exact_outputs_keys_and_objects(family):
    model, inputs = _family(family)
    keys = list(model.state_dict().keys())
    originals = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = output_of(model, inputs)
    peftcore.wrap(model, "lora", rank=4)
    _perturb_adapters(model)
    assert not torch.equal(output_of(model, inputs), base)
    assert peftcore.unwrap(model) is model
    torch.testing.assert_close(output_of(model, inputs), base, rtol=0, atol=0)
    assert list(model.state_dict().keys()) == keys
    assert all(originals[n] is m for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "_peftcore") and peftcore.adapters(model) == {}


def test_unwrap_merge_keeps_the_adaptation():
    model, inputs = _family("llama")
    peftcore.wrap(model, "lora", rank=4)
    _perturb_adapters(model)
    adapted = output_of(model, inputs)
    peftcore.unwrap(model, merge=True)
    assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(output_of(model, inputs), adapted, rtol=1e-5, atol=1e-5)


def test_unwrap_after_merge_without_merge_flag_restores_base():
    model, inputs = _family("gpt2")
    base = output_of(model, inputs)
    peftcore.wrap(model, "lora", rank=4)
    _perturb_adapters(model)
    peftcore.merge(model)
    peftcore.unwrap(model)
    torch.testing.assert_close(output_of(model, inputs), base, rtol=1e-5, atol=1e-5)


def test_disabled_runs_the_base_model():
    model, inputs = _family("minilm")
    base = output_of(model, inputs)
    peftcore.wrap(model, "lora")
    _perturb_adapters(model)
    adapted = output_of(model, inputs)
    with peftcore.disabled(model):
        torch.testing.assert_close(output_of(model, inputs), base, rtol=0, atol=0)
    torch.testing.assert_close(output_of(model, inputs), adapted, rtol=0, atol=0)


def test_disabled_restores_even_on_error():
    model, inputs = _family("gpt2")
    peftcore.wrap(model, "lora")
    _perturb_adapters(model)
    adapted = output_of(model, inputs)
    with pytest.raises(RuntimeError):
        with peftcore.disabled(model):
            raise RuntimeError("boom")
    torch.testing.assert_close(output_of(model, inputs), adapted, rtol=0, atol=0)


def test_disabled_refuses_merged_adapters():
    model, _ = _family("gpt2")
    peftcore.wrap(model, "lora")
    peftcore.merge(model)
    with pytest.raises(peftcore.AdapterStateError, match="merged"):
        with peftcore.disabled(model):
            pass


def test_several_adapters_activate_and_delete():
    model, inputs = _family("llama")
    base = output_of(model, inputs)
    peftcore.wrap(model, "lora", name="a", rank=4)
    _perturb_adapters(model, seed=1)
    out_a = output_of(model, inputs)
    peftcore.wrap(model, "lora", name="b", rank=2, targets=["q_proj", "v_proj"])
    table = peftcore.adapters(model)
    assert list(table) == ["a", "b"] and table["b"].active and not table["a"].active
    # b is zero at init, a inactive: base outputs
    torch.testing.assert_close(output_of(model, inputs), base, rtol=0, atol=0)
    for n, p in model.named_parameters():
        assert p.requires_grad == (n.endswith(".b") and "lora_" in n), n
    peftcore.activate(model, "a")
    torch.testing.assert_close(output_of(model, inputs), out_a, rtol=0, atol=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B.b"):
                p.fill_(0.01)
    peftcore.activate(model, "b")
    out_b = output_of(model, inputs)
    assert not torch.allclose(out_b, out_a)
    peftcore.activate(model, ["a", "b"])
    # in one layer, the deltas of both adapters add up
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 32)
    expected = layer.base_layer(x)
    for name in ("a", "b"):
        scale = layer.lora_config[name].scale
        expected = expected + scale * x @ layer.lora_A[name].T @ layer.lora_B[name].T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    peftcore.delete(model, "a")
    assert list(peftcore.adapters(model)) == ["b"]
    torch.testing.assert_close(output_of(model, inputs), out_b, rtol=0, atol=0)
    peftcore.delete(model, "b")
    assert peftcore.adapters(model) == {}
    torch.testing.assert_close(output_of(model, inputs), base, rtol=0, atol=0)


def test_activate_unknown_name_raises_and_keeps_state():
    model, _ = _family("gpt2")
    peftcore.wrap(model, "lora")
    with pytest.raises(peftcore.AdapterNotFoundError, match="no adapter named 'nope'"):
        peftcore.activate(model, "nope")
    assert peftcore.adapters(model)["default"].active


def test_deepcopy_and_pickle_of_wrapped_model():
    model, inputs = _family("gpt2")
    peftcore.wrap(model, "lora", rank=4)
    _perturb_adapters(model)
    expected = output_of(model, inputs)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(output_of(clone, inputs), expected, rtol=0, atol=0)
    assert list(peftcore.adapters(clone)) == ["default"]
    peftcore.unwrap(clone)  # independent of the original
    assert peftcore.adapters(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(output_of(loaded, inputs), expected, rtol=0, atol=0)
    pickle.loads(pickle.dumps(model))


def test_to_dtype_moves_adapters():
    model, inputs = _family("llama")
    peftcore.wrap(model, "lora", rank=4)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert output_of(model, inputs).dtype == torch.float64


def test_torch_compile_of_wrapped_model():
    model, inputs = _family("gpt2")
    peftcore.wrap(model, "lora", rank=4)
    _perturb_adapters(model)
    expected = output_of(model, inputs)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        got = compiled(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_generate_still_works():
    model, inputs = _family("gpt2")
    peftcore.wrap(model, "lora", rank=4)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_save_pretrained_of_wrapped_model_loads_as_base(tmp_path):
    from transformers import AutoModelForCausalLM

    model, inputs = _family("gpt2")
    peftcore.wrap(model, "lora", rank=4)
    _perturb_adapters(model)
    base_keys = {k for k in model.state_dict() if "lora_" not in k}
    model.save_pretrained(tmp_path)
    with peftcore.disabled(model):
        base = output_of(model, inputs)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) <= base_keys | {"lm_head.weight"}
    torch.testing.assert_close(output_of(reloaded, inputs), base, rtol=0, atol=0)


def test_load_state_dict_of_original_keys_into_wrapped_model():
    model, inputs = _family("llama")
    original = copy.deepcopy(model.state_dict())
    peftcore.wrap(model, "lora")
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.mul_(0.5)
    missing, unexpected = model.load_state_dict(original, strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    with peftcore.disabled(model):
        got = output_of(model, inputs)
    peftcore.unwrap(model)
    torch.testing.assert_close(got, output_of(model, inputs), rtol=0, atol=0)


def test_plain_module_with_every_layer_kind():
    model = mlp()
    ids = torch.randint(0, 20, (2, 5))
    base = model(ids)
    peftcore.wrap(model, "lora", rank=2, targets=["embed", "conv", "fc1", "fc2"])
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"LoraEmbedding", "LoraConv", "LoraLinear"} <= kinds
    torch.testing.assert_close(model(ids), base, rtol=0, atol=0)


# -- errors leave the model unchanged ------------------------------------------------------------------

def _fingerprint(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        copy.deepcopy(model.__dict__.get("_peftcore")),
    )


def _assert_unchanged(model, fingerprint):
    modules, state, flags, peft_state = _fingerprint(model)
    assert modules == fingerprint[0]
    assert state.keys() == fingerprint[1].keys()
    assert all(torch.equal(state[k], fingerprint[1][k]) for k in state)
    assert flags == fingerprint[2]
    assert (peft_state is None) == (fingerprint[3] is None)
    if peft_state is not None:
        assert list(peft_state.adapters) == list(fingerprint[3].adapters)
        assert peft_state.active == fingerprint[3].active


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"rank": 0}, ValueError, "rank must be a positive int"),
        ({"rank": -3}, ValueError, "rank"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"init": "xavier"}, ValueError, "init must be one of default, gaussian, pissa"),
        ({"rnak": 4}, ValueError, "no option 'rnak'"),
        ({"targets": ["quer"]}, ValueError, "'quer' matches no module.*query"),
        ({"targets": "nothing\\..*"}, ValueError, "matches no module"),
        ({"targets": ["LayerNorm"]}, TypeError, "no layer handler for its type.*LayerNorm.*register_layer"),
        ({"targets": ["attention"]}, TypeError, "no layer handler"),
        ({"targets": ["query"], "layers": [9]}, ValueError, "block 9 does not exist"),
        ({"exclude": ["nonexistent"]}, ValueError, "'nonexistent' matches no module"),
        ({"trainable": ["query"], "targets": ["query"]}, ValueError, "both an adapter target and trainable"),
        ({"name": "a.b"}, ValueError, "adapter name 'a.b' is not valid"),
    ],
)
def test_bad_wrap_raises_clear_error_and_leaves_model_unchanged(options, error, match):
    model = minilm()
    fingerprint = _fingerprint(model)
    with pytest.raises(error, match=match) as info:
        peftcore.wrap(model, "lora", **options)
    assert isinstance(info.value, peftcore.PeftcoreError)
    _assert_unchanged(model, fingerprint)


def test_unknown_method_raises_plugin_error():
    model = minilm()
    with pytest.raises(peftcore.PluginError, match="no method named 'loar'; available: .*lora"):
        peftcore.wrap(model, "loar")


def test_wrap_failing_part_way_rolls_back(monkeypatch):
    from peftcore.tuners.lora import layers

    model = minilm()
    peftcore.wrap(model, "lora", name="first", targets=["query"])
    fingerprint = _fingerprint(model)
    calls = {"n": 0}
    original = layers.LoraLayer.add_adapter

    def failing(self, name, config):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure in the middle of attach")
        return original(self, name, config)

    monkeypatch.setattr(layers.LoraLayer, "add_adapter", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        peftcore.wrap(model, "lora", name="second", targets=["query", "value"])
    assert calls["n"] == 5
    _assert_unchanged(model, fingerprint)
    assert all(list(m.lora_A.keys()) == ["first"] for m in model.modules() if isinstance(m, layers.LoraLayer))


def test_wrap_same_name_twice_raises():
    model = minilm()
    peftcore.wrap(model, "lora")
    fingerprint = _fingerprint(model)
    with pytest.raises(peftcore.AdapterStateError, match="already has an adapter named 'default'"):
        peftcore.wrap(model, "lora")
    _assert_unchanged(model, fingerprint)


def test_operations_on_plain_model_raise():
    model = minilm()
    for call in (peftcore.merge, peftcore.unmerge, peftcore.unwrap):
        with pytest.raises(peftcore.AdapterStateError, match="holds no peftcore adapter"):
            call(model)
    with pytest.raises(peftcore.AdapterStateError):
        with peftcore.disabled(model):
            pass


def test_activate_away_from_merged_adapter_raises():
    model, _ = _family("gpt2")
    peftcore.wrap(model, "lora", name="a")
    peftcore.wrap(model, "lora", name="b")
    peftcore.activate(model, "a")
    peftcore.merge(model)
    with pytest.raises(peftcore.AdapterStateError, match="unmerge"):
        peftcore.activate(model, "b")
    assert peftcore.adapters(model)["a"].active


def test_mha_out_proj_is_refused():
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True)
    with pytest.raises(peftcore.UnsupportedModuleError, match="NonDynamicallyQuantizableLinear"):
        peftcore.wrap(model, "lora", targets=["self_attn.out_proj"])
    peftcore.wrap(model, "lora")  # default targets skip it
    assert "self_attn.out_proj" not in model._peftcore.adapters["default"].targets


def test_wrap_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        peftcore.wrap(object(), "lora")


# -- training mode: adapters follow the model (eval after wrap/load means no dropout) ------------------

def test_wrap_on_an_eval_model_keeps_it_deterministic_and_train_mode_trains_with_dropout():
    model, inputs = _family("minilm")  # eval mode, as a user runs inference
    peftcore.wrap(model, "lora", rank=4, dropout=0.1)
    _perturb_adapters(model)
    assert not any(m.training for m in model.modules())
    first, second = output_of(model, inputs), output_of(model, inputs)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.train()
    assert all(m.training for m in model.modules())
    assert not torch.equal(output_of(model, inputs), output_of(model, inputs))  # dropout runs in training

    trained = minilm().train()
    peftcore.wrap(trained, "adapter", size=8)
    assert all(m.training for m in trained.modules())


def test_load_onto_an_eval_model_gives_the_saved_outputs(tmp_path):
    model, inputs = _family("minilm")
    peftcore.wrap(model, "lora", rank=4, dropout=0.1)
    _perturb_adapters(model)
    expected = output_of(model, inputs)
    peftcore.save(model, tmp_path / "a")
    fresh = minilm()
    peftcore.load(fresh, tmp_path / "a")
    assert not any(m.training for m in fresh.modules())
    torch.testing.assert_close(output_of(fresh, inputs), expected, rtol=0, atol=0)


def test_an_adapter_layer_takes_the_mode_of_the_module_it_replaces():
    model = mlp().train()
    model.fc1.eval()  # a user who froze one layer's dropout/batch-norm behaviour
    peftcore.wrap(model, "lora", rank=2, targets=["fc1", "fc2"])
    assert not model.fc1.training and not model.fc1.lora_A.training
    assert model.fc2.training and model.fc2.lora_A.training


# -- merge, unmerge and unwrap(merge=True) are all or nothing ------------------------------------------

def _two_merged_adapters_failing_at(monkeypatch, method_name, fail_name, fail_at):
    from peftcore.tuners.lora import layers

    model, inputs = _family("gpt2")
    peftcore.wrap(model, "lora", name="a", rank=2)
    peftcore.wrap(model, "lora", name="b", rank=3)
    _perturb_adapters(model)
    peftcore.activate(model, ["a", "b"])
    original = getattr(layers.LoraLayer, method_name)
    calls = {"n": 0}

    def failing(self, name):
        if name == fail_name:
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise RuntimeError(f"simulated failure in {method_name}")
        return original(self, name)

    return model, inputs, (layers.LoraLayer, method_name, failing)


@pytest.mark.parametrize("fail_at", [1, 3])
def test_merge_failing_on_the_second_adapter_takes_the_first_back_out(monkeypatch, fail_at):
    model, inputs, patch = _two_merged_adapters_failing_at(monkeypatch, "merge", "b", fail_at)
    expected = output_of(model, inputs)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    monkeypatch.setattr(*patch)
    with pytest.raises(RuntimeError, match="simulated failure in merge"):
        peftcore.merge(model)
    assert not any(info.merged for info in peftcore.adapters(model).values())
    assert not any(m.merged_adapters for m in model.modules() if hasattr(m, "merged_adapters"))
    now = model.state_dict()
    for key, value in base.items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_unmerge_failing_on_the_second_adapter_merges_the_first_again(monkeypatch):
    model, inputs, patch = _two_merged_adapters_failing_at(monkeypatch, "unmerge", "b", 2)
    peftcore.merge(model)
    merged = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    monkeypatch.setattr(*patch)
    with pytest.raises(RuntimeError, match="simulated failure in unmerge"):
        peftcore.unmerge(model)
    assert all(info.merged for info in peftcore.adapters(model).values())
    now = model.state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=1e-6)


def test_unwrap_merge_failing_leaves_the_wrapped_model_unmerged(monkeypatch):
    model, inputs, patch = _two_merged_adapters_failing_at(monkeypatch, "merge", "b", 2)
    expected = output_of(model, inputs)
    fingerprint = _fingerprint(model)
    monkeypatch.setattr(*patch)
    with pytest.raises(RuntimeError, match="simulated failure in merge"):
        peftcore.unwrap(model, merge=True)
    modules, state, flags, peft_state = _fingerprint(model)
    assert modules == fingerprint[0] and flags == fingerprint[2]
    assert list(peft_state.adapters) == ["a", "b"] and not any(r.merged for r in peft_state.adapters.values())
    for key, value in fingerprint[1].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=1e-5, atol=1e-5)
