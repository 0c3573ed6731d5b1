"""Bottleneck adapters: insertion points, the computation per placement, the whole lifecycle, training."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftcore
from models import FAMILIES, llama, minilm, output_of, token_inputs
from peftcore.errors import ConfigError
from peftcore.tuners.adapter import AdapterConfig
from peftcore.tuners.adapter.layers import BottleneckLayer

PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]


def _family(name):
    factory, inputs = FAMILIES[name]
    return factory(), inputs()


def _perturb(model, name=None, seed=1, std=0.2):
    """Gives the adapters (all, or those of adapter ``name``) non-zero up-projections."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, p in model.named_parameters():
            if ".bottleneck." in path and (name is None or f".bottleneck.{name}." in path):
                p.add_(std * torch.randn(p.shape, generator=g))


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def _hook_count(model):
    """Hooks on the model's modules, but for the two of every wrapped model (peftcore.routing's
    adapter_names hooks)."""
    from peftcore import routing

    ours = (routing._pre_hook, routing._post_hook)
    return sum(
        sum(h not in ours for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())) for m in model.modules()
    )


def _delta(block, x, cfg):
    """A reference bottleneck (without the residual), from the adapter's parameters."""
    h = F.linear(x, block.down.weight, block.down.bias)
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    return cfg.scale * F.linear(act[cfg.activation](h), block.up.weight, block.up.bias)


# -- insertion points ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family, placement, expected", [
    ("gpt2", "houlsby", ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                         "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
    ("gpt2", "pfeiffer", ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
    ("llama", "houlsby", ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                          "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]),
    ("llama", "parallel", ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
])
def test_default_insertion_points(family, placement, expected):
    model, _ = _family(family)
    peftcore.wrap(model, "adapter", size=4, placement=placement)
    assert model._peftcore.adapters["default"].targets == expected
    assert sorted(_layers(model)) == sorted(expected)


def test_minilm_insertion_points_and_parallel_input():
    model = minilm()
    peftcore.wrap(model, "adapter", placement="houlsby")
    targets = model._peftcore.adapters["default"].targets
    assert len(targets) == 12 and targets[:2] == ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"]
    peftcore.unwrap(model)
    peftcore.wrap(model, "adapter", placement="parallel", layers=[0, -1])
    layers = _layers(model)
    assert sorted(layers) == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.5.output.dense"]
    assert layers["bert.encoder.layer.5.output.dense"].input_path == "bert.encoder.layer.5.intermediate"


@pytest.mark.parametrize("family", ["minilm", "gpt2", "llama"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_wrapped_model_equals_base_exactly_at_init(family, placement):
    model, inputs = _family(family)
    before = output_of(model, inputs)
    peftcore.wrap(model, "adapter", size=8, placement=placement)
    torch.testing.assert_close(output_of(model, inputs), before, rtol=0, atol=0)
    for layer in _layers(model).values():
        assert torch.all(layer.bottleneck["default"].up.weight == 0) and torch.all(layer.bottleneck["default"].up.bias == 0)
        assert layer.bottleneck["default"].down.weight.abs().max() > 0


# -- what each placement computes ------------------------------------------------------------------------
def test_sequential_adapter_adds_bottleneck_of_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh())
    base = model[0]
    peftcore.wrap(model, "adapter", targets=["0"], size=3, activation="silu", scale=0.5)
    _perturb(model)
    layer = model[0]
    x = torch.randn(4, 2, 6)
    y = base(x)
    expected = torch.tanh(y + _delta(layer.bottleneck["default"], y, layer.adapter_config["default"]))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.bottleneck["default"].down.weight.shape == (3, 10) and layer.bottleneck["default"].up.weight.shape == (10, 3)


def test_parallel_adapter_on_any_module_reads_its_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    base = model[0]
    peftcore.wrap(model, "adapter", targets=["0"], size=3, placement="parallel", activation="relu")
    _perturb(model)
    layer = model[0]
    assert layer.input_path == "0" and _hook_count(model) == 0  # own input: no hook
    x = torch.randn(5, 6)
    expected = base(x) + _delta(layer.bottleneck["default"], x, layer.adapter_config["default"])
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.bottleneck["default"].down.weight.shape == (3, 6) and layer.bottleneck["default"].up.weight.shape == (4, 3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_parallel_adapter_adds_bottleneck_of_the_ffn_input_to_its_output(family):
    model, _ = _family(family)
    peftcore.wrap(model, "adapter", size=5, placement="parallel")
    _perturb(model)
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    mlp = blocks[1].mlp
    layer = mlp.c_proj if family == "gpt2" else mlp.down_proj
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        with peftcore.disabled(model):
            base_out = mlp(x)
        expected = base_out + _delta(layer.bottleneck["default"], x, layer.adapter_config["default"])
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_parallel_adapter_in_bert_reads_the_attention_output():
    model = minilm()
    peftcore.wrap(model, "adapter", size=16, placement="parallel")
    _perturb(model, std=0.05)
    block = model.bert.encoder.layer[2]
    layer = block.output.dense
    x = torch.randn(2, 5, 384)  # the attention output: input of the feed-forward block
    with torch.no_grad():
        intermediate = block.intermediate(x)
        got = block.output(intermediate, x)
        ffn = layer.base_layer(intermediate) + _delta(layer.bottleneck["default"], x, layer.adapter_config["default"])
        expected = block.output.LayerNorm(ffn + x)  # eval mode: dropout is the identity
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_two_running_adapters_add_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    base = model[0]
    peftcore.wrap(model, "adapter", name="a", targets=["0"], size=2)
    peftcore.wrap(model, "adapter", name="b", targets=["0"], size=3, placement="parallel", scale=2.0)
    _perturb(model)
    layer = model[0]
    x = torch.randn(3, 6)
    y = base(x)
    da = _delta(layer.bottleneck["a"], y, layer.adapter_config["a"])
    db = _delta(layer.bottleneck["b"], x, layer.adapter_config["b"])
    with torch.no_grad():
        peftcore.activate(model, "a")
        torch.testing.assert_close(model(x), y + da, rtol=1e-5, atol=1e-6)
        peftcore.activate(model, "b")
        torch.testing.assert_close(model(x), y + db, rtol=1e-5, atol=1e-6)
        peftcore.activate(model, ["a", "b"])
        torch.testing.assert_close(model(x), y + da + db, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_backend_option_gives_the_same_outputs(backend):
    from peftcore.ops import bottleneck_cpp

    if backend == "cpp" and not bottleneck_cpp.CPP.available()[0]:
        pytest.skip(bottleneck_cpp.CPP.available()[1])
    model, inputs = _family("llama")
    peftcore.wrap(model, "adapter", size=8, placement="houlsby", backend=backend)
    _perturb(model)
    got = output_of(model, inputs)
    config = model._peftcore.adapters["default"].config
    assert all(layer.adapter_config["default"] is config for layer in _layers(model).values())
    config.backend = "reference"
    torch.testing.assert_close(got, output_of(model, inputs), rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_rejected_at_wrap_with_a_clear_error():
    model, inputs = _family("gpt2")
    before = output_of(model, inputs)
    with pytest.raises(ConfigError, match="adapter backend 'nope' does not exist; choose 'auto' or one of .*reference"):
        peftcore.wrap(model, "adapter", size=4, backend="nope")
    assert not any("bottleneck" in name for name, _ in model.named_modules())
    torch.testing.assert_close(output_of(model, inputs), before, rtol=0, atol=0)


# -- lifecycle --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, placement", [("minilm", "houlsby"), ("gpt2", "parallel"), ("llama", "pfeiffer"), ("llama", "parallel")])
def test_save_load_round_trip_reproduces_outputs_exactly(tmp_path, family, placement):
    model, inputs = _family(family)
    peftcore.wrap(model, "adapter", size=8, placement=placement, trainable=["classifier"] if family == "minilm" else None)
    _perturb(model)
    expected = output_of(model, inputs)
    peftcore.save(model, tmp_path / "ad")
    fresh, _ = _family(family)
    peftcore.load(fresh, tmp_path / "ad")
    torch.testing.assert_close(output_of(fresh, inputs), expected, rtol=0, atol=0)
    assert peftcore.adapters(fresh)["default"].method == "adapter"
    assert fresh._peftcore.adapters["default"].config == model._peftcore.adapters["default"].config


def test_saved_keys_name_module_paths(tmp_path):
    from safetensors.torch import load_file

    model, _ = _family("gpt2")
    peftcore.wrap(model, "adapter", size=4, placement="pfeiffer")
    path = peftcore.save(model, tmp_path / "ad")
    keys = sorted(load_file(str(path / "adapter_model.safetensors")))
    assert keys == sorted(
        f"transformer.h.{i}.mlp.c_proj.bottleneck.{p}.{t}" for i in (0, 1) for p in ("down", "up") for t in ("weight", "bias")
    )


@pytest.mark.parametrize("family, placement", [("minilm", "parallel"), ("gpt2", "houlsby"), ("llama", "parallel")])
def test_unwrap_restores_exact_outputs_keys_objects_and_removes_hooks(family, placement):
    model, inputs = _family(family)
    before = output_of(model, inputs)
    keys = list(model.state_dict())
    modules = dict(model.named_modules())
    hooks = _hook_count(model)
    peftcore.wrap(model, "adapter", size=8, placement=placement)
    if placement == "parallel":
        assert _hook_count(model) > hooks
    _perturb(model)
    assert not torch.equal(output_of(model, inputs), before)
    assert peftcore.unwrap(model) is model
    torch.testing.assert_close(output_of(model, inputs), before, rtol=0, atol=0)
    assert list(model.state_dict()) == keys
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert _hook_count(model) == hooks and not hasattr(model, "_peftcore")
    assert all(p.requires_grad for p in model.parameters())


def test_merge_is_refused_clearly():
    model, inputs = _family("gpt2")
    peftcore.wrap(model, "adapter", size=4)
    with pytest.raises(peftcore.AdapterStateError, match="uses 'adapter', which cannot be merged"):
        peftcore.merge(model)
    with pytest.raises(peftcore.AdapterStateError, match="cannot be merged"):
        peftcore.unwrap(model, merge=True)
    assert peftcore.adapters(model)["default"].active


def test_summary_counts_adapter_parameters():
    model = minilm()
    total_before = sum(p.numel() for p in model.parameters())
    peftcore.wrap(model, "adapter", size=64, placement="houlsby", trainable=["classifier"])
    info = peftcore.summary(model)
    per_adapter = 12 * (384 * 64 + 64 + 64 * 384 + 384)
    head = sum(p.numel() for p in model.classifier.parameters())
    (row,) = info.adapters
    assert (row.method, row.targets, row.adapter_params, row.trainable_module_params) == ("adapter", 12, per_adapter, head)
    assert info.total == total_before + per_adapter and info.trainable == per_adapter + head
    assert "adapter" in str(info)


def test_disabled_runs_the_base_and_several_adapters_switch():
    model, inputs = _family("llama")
    before = output_of(model, inputs)
    peftcore.wrap(model, "adapter", name="seq", size=4, placement="houlsby")
    peftcore.wrap(model, "adapter", name="par", size=6, placement="parallel")
    _perturb(model, "seq", seed=1)
    _perturb(model, "par", seed=2)
    outs = {}
    for name in ("seq", "par"):
        peftcore.activate(model, name)
        outs[name] = output_of(model, inputs)
        assert not torch.equal(outs[name], before)
        assert all(p.requires_grad == (f".bottleneck.{name}." in n) for n, p in model.named_parameters())
    assert not torch.equal(outs["seq"], outs["par"])
    with peftcore.disabled(model):
        torch.testing.assert_close(output_of(model, inputs), before, rtol=0, atol=0)
    peftcore.delete(model, "par")
    assert list(peftcore.adapters(model)) == ["seq"] and _hook_count(model) == 0
    peftcore.activate(model, "seq")
    torch.testing.assert_close(output_of(model, inputs), outs["seq"], rtol=0, atol=0)


def test_deepcopy_and_pickle_keep_the_parallel_input_hooks():
    model, inputs = _family("gpt2")
    peftcore.wrap(model, "adapter", size=4, placement="parallel")
    _perturb(model)
    expected = output_of(model, inputs)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(output_of(clone, inputs), expected, rtol=0, atol=0)
    # the clone's hooks feed the clone's layers: changing the clone leaves the original alone
    _perturb(clone, seed=5)
    changed = output_of(clone, inputs)
    assert not torch.equal(changed, expected)
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=0, atol=0)
    peftcore.unwrap(clone)
    assert _hook_count(clone) == 0 and _hook_count(model) == 2
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(output_of(loaded, inputs), expected, rtol=0, atol=0)
    torch.testing.assert_close(output_of(pickle.loads(pickle.dumps(model)), inputs), expected, rtol=0, atol=0)


def test_failed_wrap_rolls_back_layers_and_hooks(monkeypatch):
    model, inputs = _family("llama")
    before = output_of(model, inputs)
    keys = list(model.state_dict())
    calls = {"n": 0}
    original = BottleneckLayer.add_adapter

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure in the middle of attach")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BottleneckLayer, "add_adapter", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        peftcore.wrap(model, "adapter", size=4, placement="parallel")
    assert calls["n"] == 2
    assert not _layers(model) and _hook_count(model) == 0 and not hasattr(model, "_peftcore")
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(output_of(model, inputs), before, rtol=0, atol=0)


def test_gradient_checkpointing_and_autocast_with_parallel_adapters(monkeypatch):
    inputs = token_inputs()
    batch = {**inputs, "labels": inputs["input_ids"]}
    captures = []
    original = BottleneckLayer._capture_input
    monkeypatch.setattr(BottleneckLayer, "_capture_input", lambda self, *a: captures.append(1) or original(self, *a))
    grads, counts = [], []
    for checkpointing in (False, True):
        captures.clear()
        model = llama()
        peftcore.wrap(model, "adapter", size=4, placement="parallel")
        _perturb(model)
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(**batch).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
        counts.append(len(captures))
    assert counts == [2, 4]  # with checkpointing, the recomputed blocks read their FFN input again
    assert len(grads[1]) == 8 and all(torch.equal(a, b) for a, b in zip(*grads))
    # autocast: the base layers compute in bfloat16, the adapters' weights stay float32
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".bottleneck." in n)


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_torch_compile_and_generate(placement):
    model, inputs = _family("gpt2")
    peftcore.wrap(model, "adapter", size=4, placement=placement)
    _perturb(model)
    expected = output_of(model, inputs)
    with torch.no_grad():
        got = torch.compile(model, backend="aot_eager")(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


# -- combining with LoRA --------------------------------------------------------------------------------------
def test_lora_on_query_value_plus_adapters_after_the_outputs(tmp_path):
    model, inputs = _family("minilm")
    before = output_of(model, inputs)
    peftcore.wrap(model, "lora", name="lora", targets=["query", "value"], rank=4)
    peftcore.wrap(model, "adapter", name="ad", size=16, placement="houlsby")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    _perturb(model, "ad", std=0.05)
    alone = {}
    for name in ("lora", "ad"):
        peftcore.activate(model, name)
        alone[name] = output_of(model, inputs)
    peftcore.activate(model, ["lora", "ad"])
    both = output_of(model, inputs)
    assert not torch.equal(both, alone["lora"]) and not torch.equal(both, alone["ad"])
    for name in ("lora", "ad"):
        peftcore.save(model, tmp_path / name, name=name)
    fresh = minilm()
    peftcore.load(fresh, tmp_path / "lora")
    peftcore.load(fresh, tmp_path / "ad")
    peftcore.activate(fresh, ["lora", "ad"])
    torch.testing.assert_close(output_of(fresh, inputs), both, rtol=0, atol=0)
    peftcore.unwrap(model)
    torch.testing.assert_close(output_of(model, inputs), before, rtol=0, atol=0)


def test_adapter_on_a_lora_wrapped_module_is_refused_either_way():
    model = minilm()
    peftcore.wrap(model, "lora", rank=4)  # every linear layer
    with pytest.raises(peftcore.UnsupportedModuleError, match="already holds a 'lora' adapter"):
        peftcore.wrap(model, "adapter", name="ad")
    assert list(peftcore.adapters(model)) == ["default"]
    model = minilm()
    peftcore.wrap(model, "adapter", name="ad")
    with pytest.raises(peftcore.UnsupportedModuleError, match="already holds a 'adapter' adapter"):
        peftcore.wrap(model, "lora", rank=4)
    assert list(peftcore.adapters(model)) == ["ad"]


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    (dict(size=0), "size must be a positive int"),
    (dict(size=2.5), "size must be a positive int"),
    (dict(placement="middle"), "placement must be one of houlsby, pfeiffer, parallel"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(rank=8), "adapter has no option 'rank'"),
])
def test_bad_options_raise_config_error_and_leave_the_model_unchanged(options, match):
    model, inputs = _family("gpt2")
    before = output_of(model, inputs)
    with pytest.raises(peftcore.ConfigError, match=match):
        peftcore.wrap(model, "adapter", **options)
    assert not hasattr(model, "_peftcore") and not _layers(model)
    torch.testing.assert_close(output_of(model, inputs), before, rtol=0, atol=0)


def test_model_without_known_blocks_needs_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(peftcore.TargetError, match="no transformer block of a known layout.*targets="):
        peftcore.wrap(model, "adapter")
    with pytest.raises(peftcore.UnsupportedModuleError, match="width of its output is unknown"):
        peftcore.wrap(model, "adapter", targets=["1"])
    with pytest.raises(peftcore.TargetError, match="nest"):
        peftcore.wrap(nn.Sequential(nn.Sequential(nn.Linear(4, 4))), "adapter", targets=["0", "0.0"])
    peftcore.wrap(model, "adapter", targets=["0", "2"], size=2)
    assert sorted(_layers(model)) == ["0", "2"]


def test_config_defaults():
    cfg = AdapterConfig()
    assert (cfg.size, cfg.placement, cfg.activation, cfg.scale, cfg.backend) == (64, "houlsby", "gelu", 1.0, "auto")


# -- training ----------------------------------------------------------------------------------------------------
def _train(model, batch, steps=4, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("family, placement", [
    ("minilm", "houlsby"), ("gpt2", "houlsby"), ("llama", "houlsby"), ("gpt2", "pfeiffer"), ("llama", "parallel"),
    pytest.param("minilm", "parallel", marks=pytest.mark.slow),
])
def test_a_few_steps_lower_the_loss(family, placement):
    model, inputs = _family(family)
    if family == "minilm":
        batch = {**inputs, "labels": torch.tensor([0, 2])}
    else:
        batch = {**inputs, "labels": inputs["input_ids"]}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    peftcore.wrap(model, "adapter", size=16, placement=placement)
    losses = _train(model, batch)
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if ".bottleneck." not in n:
            key = n.replace(".base_layer.", ".")
            assert torch.equal(p, frozen[key]), f"base parameter {n} changed"


@pytest.mark.parametrize("family, placement", [
    ("llama", "parallel"),
    *[pytest.param(f, p, marks=pytest.mark.slow) for f in ("bert", "gpt2", "llama") for p in PLACEMENTS
      if (f, p) != ("llama", "parallel")],
])
def test_conformance_kit(family, placement):
    testing = pytest.importorskip("peftcore.testing")
    report = testing.check_method("adapter", lambda: testing.tiny_model(family), size=8, placement=placement)
    assert set(report.passed) == set(testing.CHECKS), str(report)
