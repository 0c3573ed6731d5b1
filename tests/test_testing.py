"""The conformance kit: LoRA passes it on real models, and each check catches the bug it is for.

Every broken method below is LoRA with one deliberate bug, registered in code under its own
name; the kit must fail it at the check meant to catch that bug, with a message saying so.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import peftcore
from models import gpt2, llama, minilm, minilm_inputs, mlp
from peftcore import registry
from peftcore.errors import ConfigError
from peftcore.testing import CHECKS, ConformanceReport, check_method, tiny_model
from peftcore.tuners.base import LayerMethod
from peftcore.tuners.lora.config import LoraConfig
from peftcore.tuners.lora.layers import LINEAR, LoraLinear


def _mlp_inputs():
    return torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_conforms_on_tiny_decoders(family):
    report = check_method("lora", {"gpt2": gpt2, "llama": llama}[family], rank=4, alpha=8)
    assert report.passed == list(CHECKS), str(report)
    assert report.provider == {"distribution": "peftcore", "version": peftcore.__version__}
    assert report.num_targets == (8 if family == "gpt2" else 14)
    assert report.max_abs_diff["identity_at_init"] == 0.0 and report.max_abs_diff["merge"] < 1e-5


@pytest.mark.slow  # 22M parameters, converted to float64 and back: seconds, not milliseconds
def test_lora_conforms_on_pretrained_minilm_with_its_tokenizer():
    report = check_method("lora", minilm, inputs_factory=minilm_inputs, rank=4, targets=["query", "value"])
    assert report.passed == list(CHECKS), str(report)
    assert report.num_targets == 12


def test_lora_conforms_on_a_plain_module_with_explicit_inputs():
    report = check_method("lora", mlp, inputs_factory=_mlp_inputs, targets=["embed", "conv", "fc1", "fc2"], rank=2)
    assert report.passed == list(CHECKS)
    assert "identity_at_init" in str(report) and "lora (peftcore" in str(report)


def test_tiny_model_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = tiny_model("llama"), tiny_model("llama")
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(tiny_model("llama", seed=1).lm_head.weight, a.lm_head.weight)
    with pytest.raises(ConfigError, match="unknown family 't5'"):
        tiny_model("t5")


# -- broken methods: LoRA with one bug each ---------------------------------------------------------
def _broken(name: str, layer_base: type = LoraLinear, method_class: type = LayerMethod, **method_fields):
    """Registers a LoRA variant called ``name`` (its layer class derived from ``layer_base``)."""
    layer = type(f"{name}_layer", (layer_base,), {"method": name})
    handler = dataclasses.replace(LINEAR, method=name, layer=layer)
    method = method_class(name=name, config_class=LoraConfig, **{"merges": True, **method_fields})
    return handler, method


@pytest.fixture
def register():
    names = []

    def _register(handler, method):
        peftcore.register_layer(f"{method.name}.linear", handler)
        peftcore.register_method(method)
        names.append(method.name)
        return method.name

    yield _register
    for name in names:
        registry.METHODS.unregister(name)
        registry.LAYERS.unregister(f"{name}.linear")


def _fails(name: str, check: str, match: str) -> None:
    earlier = CHECKS[: CHECKS.index(check)]  # each check on its own: the bug may trip earlier ones too
    with pytest.raises(AssertionError, match=rf"check_method\('{name}'\).*check '{check}' failed: .*{match}"):
        check_method(name, mlp, inputs_factory=_mlp_inputs, skip=earlier)


class _NotIdentity(LoraLinear):
    def _init_factors(self, config, A, B):
        super()._init_factors(config, A, B)
        with torch.no_grad():
            B.fill_(0.1)


class _NoEffect(LoraLinear):
    def forward(self, x):
        return self.base_layer(x)


class _LossySave(LayerMethod):
    def adapter_state(self, model, name):
        return {k: v.to(torch.bfloat16) for k, v in super().adapter_state(model, name).items()}


class _FakeMerge(LoraLinear):
    def merge(self, name):
        self.merged_adapters.append(name)  # forgets to fold the delta into the weight


class _SlightlyWrongMerge(LoraLinear):
    def delta_weight(self, name):
        return super().delta_weight(name) * 1.01


class _SharesBase(LayerMethod):
    def adapter_parameters(self, model, name):
        params = super().adapter_parameters(model, name)
        first_path = params[0][0].rsplit(".", 1)[0]
        return params + [(f"{first_path}.weight", model.get_submodule(first_path).base_layer.weight)]


class _Sticky(LayerMethod):
    def detach(self, model, name):
        for _, layer in list(self._layers_with(model, name)):
            layer.remove_adapter(name)  # but leaves the adapter layer in the model


class _CrashingMerge(LoraLinear):
    def merge(self, name):
        raise RuntimeError("merge kernel missing")


class _Float32Only(LoraLinear):
    def forward(self, x):
        return super().forward(x).float()


@pytest.mark.parametrize("case, check, match", [
    (dict(layer_base=_NotIdentity), "identity_at_init", "does not compute what the base model does"),
    (dict(layer_base=_NoEffect), "disable", "the adapter has no effect"),
    (dict(method_class=_LossySave), "save_load", "differs after save and load"),
    (dict(layer_base=_FakeMerge), "merge", "outputs after merge differ"),
    (dict(layer_base=_SlightlyWrongMerge), "merge", "outputs after merge differ"),
    (dict(layer_base=_CrashingMerge), "merge", "RuntimeError: merge kernel missing"),
    (dict(method_class=_SharesBase), "gradients", "lists parameters of the base model"),
    (dict(method_class=_Sticky), "unwrap", "module paths changed"),
    (dict(layer_base=_Float32Only), "dtype", "float64"),
])
def test_each_check_catches_its_bug(register, case, check, match):
    name = f"broken_{check}_{len(match)}"
    register(*_broken(name, **case))
    _fails(name, check, match)


def test_a_method_that_declares_no_identity_or_merge_is_checked_accordingly(register):
    name = register(*_broken("no_merge_no_identity", _NotIdentity, merges=False, identity_at_init=False))
    report = check_method(name, mlp, inputs_factory=_mlp_inputs)
    assert report.skipped == {"identity_at_init": "the method declares identity_at_init = False"}
    assert report.results["merge"] == "passed: merge refused as declared (merges = False)"


def test_a_method_object_is_registered_only_while_checked():
    handler, method = _broken("transient")
    peftcore.register_layer("transient.linear", handler)
    try:
        report = check_method(method, mlp, inputs_factory=_mlp_inputs)
        assert isinstance(report, ConformanceReport) and report.method == "transient"
        assert report.provider == {"distribution": None, "version": None}
        assert "transient" not in peftcore.methods()
    finally:
        registry.LAYERS.unregister("transient.linear")


def test_skip_is_reported_and_checked():
    report = check_method("lora", mlp, inputs_factory=_mlp_inputs, skip=["dtype", "merge"])
    assert report.skipped == {"merge": "skip= asked for it", "dtype": "skip= asked for it"}
    with pytest.raises(ConfigError, match="unknown check\\(s\\) 'speed'"):
        check_method("lora", mlp, inputs_factory=_mlp_inputs, skip=["speed"])


def test_kit_argument_errors_are_clear():
    with pytest.raises(ConfigError, match="must return a torch.nn.Module"):
        check_method("lora", lambda: "not a model")
    counter = iter(range(100))
    with pytest.raises(ConfigError, match="same weights on every call"):
        check_method("lora", lambda: mlp(seed=next(counter)), inputs_factory=_mlp_inputs)
    with pytest.raises(ConfigError, match="no config.vocab_size.*inputs_factory"):
        check_method("lora", mlp)
    with pytest.raises(ConfigError, match="perturb must be a positive number"):
        check_method("lora", mlp, inputs_factory=_mlp_inputs, perturb=0)
    with pytest.raises(ConfigError, match="already holds peftcore adapters"):
        check_method("lora", lambda: peftcore.wrap(mlp(), "lora"), inputs_factory=_mlp_inputs)
    with pytest.raises(ConfigError, match="output_fn"):
        check_method("lora", mlp, inputs_factory=_mlp_inputs, output_fn=lambda out: "nothing")


def test_method_options_are_passed_to_wrap_and_bad_ones_fail_a_check():
    report = check_method("lora", mlp, inputs_factory=_mlp_inputs, rank=3, targets=["fc1"])
    assert report.num_targets == 1 and report.num_adapter_parameters == 3 * 8 + 16 * 3
    with pytest.raises(ConfigError, match="lora rank must be a positive int"):
        check_method("lora", mlp, inputs_factory=_mlp_inputs, rank=0)


def test_the_kit_leaves_no_trace():
    before = set(peftcore.methods())
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    check_method("lora", mlp, inputs_factory=_mlp_inputs)
    assert torch.equal(torch.rand(2), expected)  # global RNG untouched
    assert set(peftcore.methods()) == before


def test_a_method_that_cannot_even_attach_fails_setup(register):
    class _CannotAttach(LayerMethod):
        def attach(self, model, name, config, targets):
            raise RuntimeError("attach is broken")

    name = register(*_broken("cannot_attach", method_class=_CannotAttach))
    with pytest.raises(AssertionError, match=r"check_method\('cannot_attach'\): setting up .* RuntimeError: attach is broken"):
        check_method(name, mlp, inputs_factory=_mlp_inputs)


@pytest.mark.parametrize("method, options", [("lora", {"rank": 4, "dropout": 0.1}), ("adapter", {}), ("prefix", {}), ("prompt", {})])
def test_builtin_methods_with_dropout_pass_the_training_mode_check(method, options):
    report = check_method(method, lambda: tiny_model("bert"), **options)
    assert report.results["training_mode"] == "passed"
    assert report.results["disable"] == "passed"


def test_inputs_factory_is_called_once_so_unseeded_random_inputs_work():
    calls = []

    def inputs():
        calls.append(1)
        return torch.randn(2, 16)  # no seed of its own: the docs' example

    model = lambda: torch.manual_seed(0) and nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))  # noqa: E731
    report = check_method("lora", model, inputs_factory=inputs, rank=2)
    assert report.passed == list(CHECKS) and len(calls) == 1


def test_a_layer_whose_method_attribute_does_not_match_is_named(register):
    handler, method = _broken("mismatched")
    handler = dataclasses.replace(handler, layer=type("MismatchedLayer", (LoraLinear,), {"method": "lora"}))
    name = register(handler, method)
    with pytest.raises(AssertionError, match=r"check_method\('mismatched'\): setting up .* adapter layer at '\w+' "
                                             r"\(MismatchedLayer\) has method = 'lora', but the method is 'mismatched'"):
        check_method(name, mlp, inputs_factory=_mlp_inputs)


def _routed_gpt2():
    from peftcore.testing import tiny_model

    model = tiny_model("gpt2")
    peftcore.wrap(model, "lora", name="a", rank=2, targets=["c_attn"])
    peftcore.wrap(model, "adapter", name="bn", size=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or ".bottleneck." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 128, (3, 5), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_check_routing_passes_and_puts_the_model_back():
    from peftcore.testing import check_routing

    model, inputs = _routed_gpt2()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    check_routing(model, inputs, ["bn", "__base__", "a"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert [a.name for a in peftcore.adapters(model).values() if a.active] == ["bn"]


def test_check_routing_catches_a_routed_forward_that_ignores_the_names(monkeypatch):
    from peftcore.testing import check_routing
    from peftcore.tuners.lora import routed

    model, inputs = _routed_gpt2()
    monkeypatch.setattr(routed, "linear_forward", lambda layer, x, routing: (routing.plan(layer.adapter_names(), x, "x"), layer.base_layer(x))[1])
    with pytest.raises(AssertionError, match="example 2 routed to 'a' differs from 'a' alone"):
        check_routing(model, inputs, ["bn", "__base__", "a"])


def test_check_routing_catches_gradients_that_do_not_reach_the_adapter(monkeypatch):
    from peftcore.testing import check_routing
    from peftcore.tuners.lora import routed

    model, inputs = _routed_gpt2()
    forward = routed.linear_forward
    monkeypatch.setattr(routed, "linear_forward", lambda layer, x, routing: forward(layer, x, routing).detach())
    with pytest.raises(AssertionError, match=r"lora_A\.a gets a gradient only alone"):
        check_routing(model, inputs, ["bn", "__base__", "a"])
