"""peftcore.formats.peft: dispatch by peft_type / method, through peftcore.load and peftcore.save."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import peftcore
from formats.test_peft_lora import peft_loaded
from models import llama, output_of, token_inputs
from peftcore.errors import CheckpointError
from peftcore.formats import peft as formats_peft

peft = pytest.importorskip("peft")

TOL = {"rtol": 0, "atol": 1e-5}


def test_is_peft_config():
    assert formats_peft.is_peft_config({"peft_type": "LORA"})
    assert not formats_peft.is_peft_config({"format": "peftcore-adapter"}) and not formats_peft.is_peft_config([])


def test_every_listed_converter_exposes_the_interface():
    for name in formats_peft.CONVERTERS:
        module = formats_peft._converter(name)
        assert set(module.PEFT_TYPES) <= set(formats_peft.peft_types())
        assert set(module.METHODS) <= set(formats_peft.methods())


def test_unknown_type_and_method_are_named():
    with pytest.raises(CheckpointError, match="peft_type 'VERA'.*it reads LORA, IA3, PROMPT_TUNING, PREFIX_TUNING"):
        formats_peft.to_native(None, {"peft_type": "VERA"}, {}, "somewhere")
    with pytest.raises(CheckpointError, match="cannot hold a 'adapter' adapter.*format='peftcore'"):
        formats_peft.from_native(None, {"method": "adapter"}, {})


def test_ia3_and_prompt_tuning_load_and_save_through_peftcore(tmp_path):
    """peftcore.load / save(format="peft") reach peft-prompt's converters through the dispatcher."""
    pytest.importorskip("peftcore_ia3")
    base, inputs = llama(), token_inputs()
    configs = {
        "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                              init_ia3_weights=False),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }
    for kind, config in configs.items():
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(copy.deepcopy(base), config).eval()
            model.save_pretrained(str(tmp_path / kind))
        expected = output_of(peft_loaded(base, tmp_path / kind), inputs)
        ours = peftcore.load(copy.deepcopy(base), tmp_path / kind)
        torch.testing.assert_close(output_of(ours, inputs), expected, **TOL)
        out = peftcore.save(ours, tmp_path / f"{kind}-back", format="peft")
        assert "peft_type" in json.loads((out / "adapter_config.json").read_text())
        torch.testing.assert_close(output_of(peft_loaded(base, out), inputs), expected, **TOL)
