"""DoRA as an installed plugin: entry points, the conformance kit, HF PEFT agreement, saved provider."""

from __future__ import annotations

import importlib.metadata as metadata
import json

import pytest
import torch
from torch import nn

import peftcore
from peftcore.errors import CheckpointError, ConfigError
from peftcore.testing import CHECKS, check_method, tiny_model
from peftcore_dora import DoraMethod

DIST = metadata.metadata("peftcore-dora")


def test_found_through_entry_points():
    info = peftcore.methods()["dora"]
    assert (info.distribution, info.version) == (DIST["Name"], DIST["Version"])
    assert info.value == "peftcore_dora.method:DoraMethod"
    assert {"dora.linear", "dora.hf_conv1d"} <= set(peftcore.registry.layers())
    assert isinstance(peftcore.registry.get_method("dora"), DoraMethod)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_conformance_kit(family):
    report = check_method("dora", lambda: tiny_model(family), rank=4)
    assert report.passed == list(CHECKS), str(report)
    assert report.provider == {"distribution": DIST["Name"], "version": DIST["Version"]}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_default_targets_are_loras(family):
    dora = peftcore.wrap(tiny_model(family), "dora")
    lora = peftcore.wrap(tiny_model(family), "lora")
    assert dora._peftcore.adapters["default"].targets == lora._peftcore.adapters["default"].targets


def test_matches_hf_peft_dora_on_llama():
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = peftcore.wrap(tiny_model("llama"), "dora", targets=targets, rank=4, alpha=8)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets))
    theirs.eval()
    g = torch.Generator().manual_seed(0)
    copied = 0
    for path, module in theirs.named_modules():
        if not hasattr(module, "lora_magnitude_vector") or "default" not in module.lora_magnitude_vector:
            continue
        mine = ours.get_submodule(path.removeprefix("base_model.model."))
        with torch.no_grad():
            mine.lora_B["default"].normal_(0, 0.2, generator=g)
            mine.lora_magnitude_vector["default"].mul_(1 + 0.2 * torch.randn(mine.lora_magnitude_vector["default"].shape, generator=g))
            module.lora_A["default"].weight.copy_(mine.lora_A["default"])
            module.lora_B["default"].weight.copy_(mine.lora_B["default"])
            module.lora_magnitude_vector["default"].weight.copy_(mine.lora_magnitude_vector["default"])
        copied += 1
    assert copied == 6
    ids = torch.randint(0, 128, (2, 9), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_saved_adapter_records_the_plugin_and_loading_without_it_names_the_package(tmp_path, monkeypatch):
    model = peftcore.wrap(tiny_model("bert"), "dora", rank=2)
    peftcore.save(model, tmp_path / "dora", format="peftcore")  # the default, HF PEFT's: tests/formats/test_peft_lora.py
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert config["method"] == "dora" and config["options"] == {"rank": 2, "alpha": 4.0, "dropout": 0.0}
    assert config["provider"] == {"distribution": DIST["Name"], "version": DIST["Version"]}
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "dora" / "adapter_model.safetensors")))
    assert "bert.encoder.layer.0.attention.self.query.lora_magnitude_vector" in keys  # HF PEFT's names

    fresh = tiny_model("bert")
    monkeypatch.setenv("PEFTCORE_DISABLE_PLUGINS", "1")  # installed but hidden
    with pytest.raises(CheckpointError, match=rf"method 'dora' from the plugin distribution {DIST['Name']} {DIST['Version']}.*"
                                              rf"pip install {DIST['Name']}"):
        peftcore.load(fresh, tmp_path / "dora")
    assert not peftcore.adapters(fresh)
    monkeypatch.delenv("PEFTCORE_DISABLE_PLUGINS")
    peftcore.load(fresh, tmp_path / "dora")
    assert peftcore.adapters(fresh)["default"].method == "dora"


@pytest.mark.parametrize("options, message", [
    (dict(rank=0), "dora rank must be a positive int"),
    (dict(alpha=float("nan")), "dora alpha must be a finite number"),
    (dict(dropout=1.0), r"dora dropout must be in \[0, 1\)"),
    (dict(magnitude=1), "dora has no option 'magnitude'"),
])
def test_bad_options_are_clear_errors_and_change_nothing(options, message):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=message):
        peftcore.wrap(model, "dora", **options)
    assert not peftcore.adapters(model) and type(model[0]) is nn.Linear


def test_dropout_applies_in_training_only():
    torch.manual_seed(0)
    model = peftcore.wrap(nn.Sequential(nn.Linear(16, 8)), "dora", rank=2, dropout=0.5)
    with torch.no_grad():
        model[0].lora_B["default"].normal_(0, 0.5)
    x = torch.randn(4, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
