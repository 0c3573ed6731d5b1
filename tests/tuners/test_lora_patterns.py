"""LoRA's per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``, HF PEFT's matching rule)."""

from __future__ import annotations

import pytest
import torch

import peftcore
from models import llama, output_of, token_inputs
from peftcore.errors import ConfigError
from peftcore.tuners.lora.config import LoraConfig


def _ranks(model) -> dict[str, tuple[int, float]]:
    return {p: (m.lora_config["default"].rank, m.lora_config["default"].alpha)
            for p, m in model.named_modules() if hasattr(m, "lora_config")}


def test_patterns_set_rank_and_alpha_per_module_first_match_wins():
    model = peftcore.wrap(llama(), "lora", rank=4, targets=["q_proj", "v_proj"],
                          rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 3, "q_proj": 5},
                          alpha_pattern={"v_proj": 1.0})
    assert _ranks(model) == {
        "model.layers.0.self_attn.q_proj": (5, 8.0),  # no alpha pattern: the adapter's alpha, not 2 * 5
        "model.layers.0.self_attn.v_proj": (3, 1.0),
        "model.layers.1.self_attn.q_proj": (2, 8.0),  # the first matching pattern wins
        "model.layers.1.self_attn.v_proj": (3, 1.0),
    }
    assert tuple(model.model.layers[0].self_attn.v_proj.lora_A["default"].shape) == (3, 32)


def test_a_pattern_matches_at_a_dot_only():
    config = LoraConfig(rank=4, rank_pattern={"proj": 2})
    assert config.for_module("model.layers.0.self_attn.q_proj").rank == 4  # "q_proj" does not end in ".proj"
    assert config.for_module("model.proj").rank == 2 and config.for_module("proj").rank == 2


def test_patterns_survive_save_and_load(tmp_path):
    model = peftcore.wrap(llama(), "lora", rank=4, targets=["q_proj"], rank_pattern={"layers\\.1\\..*": 2},
                          alpha_pattern={"layers.0.self_attn.q_proj": 3.0})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    inputs = token_inputs()
    peftcore.save(model, tmp_path / "a", format="peftcore")
    loaded = peftcore.load(llama(), tmp_path / "a")
    assert _ranks(loaded) == _ranks(model)
    torch.testing.assert_close(output_of(loaded, inputs), output_of(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("options, match", [
    ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\] must be a positive int"),
    ({"rank_pattern": {"(": 2}}, "is not a regular expression"),
    ({"alpha_pattern": {"q": float("inf")}}, "must be a finite number"),
    ({"alpha_pattern": ["q"]}, "must be a dict"),
])
def test_bad_patterns_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**options)
