"""IA3 as an installed plugin: entry points, default targets, the conformance kit, saved provider."""

from __future__ import annotations

import importlib.metadata as metadata
import json

import pytest
import torch
from torch import nn

import peftcore
from peftcore.errors import CheckpointError, ConfigError, TargetError
from peftcore.testing import CHECKS, check_method, tiny_model
from peftcore_ia3 import IA3Method, IA3Spec

DIST = metadata.metadata("peftcore-ia3")


def _specs(model) -> dict[str, IA3Spec]:
    return {path: model.get_submodule(path).ia3_spec["default"] for path in model._peftcore.adapters["default"].targets}


def test_found_through_entry_points():
    info = peftcore.methods()["ia3"]
    assert (info.distribution, info.version) == (DIST["Name"], DIST["Version"])
    assert info.value == "peftcore_ia3.method:IA3Method"
    assert {"ia3.linear", "ia3.hf_conv1d"} <= set(peftcore.registry.layers())
    assert isinstance(peftcore.registry.get_method("ia3"), IA3Method)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_conformance_kit(family):
    report = check_method("ia3", lambda: tiny_model(family))
    assert report.passed == list(CHECKS), str(report)
    assert report.provider == {"distribution": DIST["Name"], "version": DIST["Version"]}


def test_default_targets_bert():
    model = peftcore.wrap(tiny_model("bert"), "ia3")
    kv, ff = IA3Spec(False, None), IA3Spec(True, None)
    expected = {}
    for i in range(2):
        prefix = f"bert.encoder.layer.{i}"
        expected |= {f"{prefix}.attention.self.key": kv, f"{prefix}.attention.self.value": kv, f"{prefix}.output.dense": ff}
    assert _specs(model) == expected  # attention.output.dense and the query are not scaled


def test_default_targets_gpt2_scale_only_the_k_and_v_thirds_of_c_attn():
    model = peftcore.wrap(tiny_model("gpt2"), "ia3")
    expected = {}
    for i in range(2):
        expected |= {f"transformer.h.{i}.attn.c_attn": IA3Spec(False, (32, 96)), f"transformer.h.{i}.mlp.c_proj": IA3Spec(True, None)}
    assert _specs(model) == expected
    assert model.transformer.h[0].attn.c_attn.ia3_l["default"].shape == (64,)
    assert model.transformer.h[0].mlp.c_proj.ia3_l["default"].shape == (128,)  # input of c_proj: 4 * n_embd


def test_scale_packed_query_scales_all_of_c_attn_as_hf_peft_does():
    model = peftcore.wrap(tiny_model("gpt2"), "ia3", scale_packed_query=True)
    assert _specs(model)["transformer.h.0.attn.c_attn"] == IA3Spec(False, None)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.ia3_l["default"].shape == (96,)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        layer.ia3_l["default"].copy_(torch.linspace(0.5, 1.5, 96))
        torch.testing.assert_close(layer(x), layer.base_layer(x) * torch.linspace(0.5, 1.5, 96))
    with pytest.raises(ConfigError, match="scale_packed_query must be True or False"):
        peftcore.wrap(tiny_model("gpt2"), "ia3", scale_packed_query="yes")


def test_default_targets_llama():
    model = peftcore.wrap(tiny_model("llama"), "ia3")
    expected = {}
    for i in range(2):
        prefix = f"model.layers.{i}"
        expected |= {f"{prefix}.self_attn.k_proj": IA3Spec(False, None), f"{prefix}.self_attn.v_proj": IA3Spec(False, None),
                     f"{prefix}.mlp.down_proj": IA3Spec(True, None)}
    assert _specs(model) == expected
    assert model.model.layers[0].self_attn.k_proj.ia3_l["default"].shape == (16,)  # 2 kv heads x 8


def test_matches_hf_peft_ia3_on_llama():
    peft = pytest.importorskip("peft")
    ours, theirs = peftcore.wrap(tiny_model("llama"), "ia3"), tiny_model("llama")
    theirs = peft.get_peft_model(theirs, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"]))
    g = torch.Generator().manual_seed(0)
    copied = 0
    for path, module in theirs.named_modules():
        if hasattr(module, "ia3_l") and "default" in getattr(module, "ia3_l", {}):
            mine = ours.get_submodule(path.removeprefix("base_model.model.")).ia3_l["default"]
            with torch.no_grad():
                mine.copy_(1 + 0.3 * torch.randn(mine.shape, generator=g))
                module.ia3_l["default"].copy_(mine.reshape(module.ia3_l["default"].shape))
            copied += 1
    assert copied == 6
    ids = torch.randint(0, 128, (2, 9), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_saved_adapter_records_the_plugin_and_loading_without_it_names_the_package(tmp_path, monkeypatch):
    model = peftcore.wrap(tiny_model("gpt2"), "ia3")
    peftcore.save(model, tmp_path / "ia3")
    config = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert config["method"] == "ia3" and config["options"] == {"feedforward": None, "scale_packed_query": False}
    assert config["provider"] == {"distribution": DIST["Name"], "version": DIST["Version"]}

    fresh = tiny_model("gpt2")
    keys = list(fresh.state_dict())
    monkeypatch.setenv("PEFTCORE_DISABLE_PLUGINS", "1")  # the plugin is installed but hidden
    with pytest.raises(CheckpointError, match=rf"method 'ia3' from the plugin distribution {DIST['Name']} {DIST['Version']}.*"
                                              rf"pip install {DIST['Name']}"):
        peftcore.load(fresh, tmp_path / "ia3")
    assert not peftcore.adapters(fresh) and list(fresh.state_dict()) == keys
    monkeypatch.delenv("PEFTCORE_DISABLE_PLUGINS")
    peftcore.load(fresh, tmp_path / "ia3")
    assert peftcore.adapters(fresh)["default"].method == "ia3"


def test_bad_options_and_targets_are_clear_errors_and_change_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetError, match="no default targets in Sequential.*targets=.*feedforward="):
        peftcore.wrap(model, "ia3")
    with pytest.raises(ConfigError, match="feedforward must be None, a regex string or a list"):
        peftcore.wrap(model, "ia3", targets=["0"], feedforward=3)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        peftcore.wrap(model, "ia3", targets=["0"], feedforward="(")
    with pytest.raises(ConfigError, match=r"feedforward=\['fc9'\] matches none of the targets \(0, 2\)"):
        peftcore.wrap(model, "ia3", targets=["0", "2"], feedforward=["fc9"])
    assert not peftcore.adapters(model) and isinstance(model[0], nn.Linear)
    peftcore.wrap(model, "ia3", targets=["0", "2"], feedforward="2")
    assert model[2].ia3_spec["default"].feedforward and not model[0].ia3_spec["default"].feedforward
