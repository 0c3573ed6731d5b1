"""The real flow: a transformers model loaded quantized (BitsAndBytesConfig, TorchAoConfig) from a
local directory, prepared, wrapped, trained, saved and loaded onto a freshly quantized base."""

from __future__ import annotations

import pytest
import torch
import transformers

import peftcore
from peftcore_quant import Lora4bit, Lora8bit, LoraTorchao, prepare_for_training

from _models import tiny_llama, train_steps

CONFIGS = {
    "bnb-nf4": (lambda: transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32), Lora4bit),
    "bnb-int8": (lambda: transformers.BitsAndBytesConfig(load_in_8bit=True), Lora8bit),
    "torchao-int8": (lambda: transformers.TorchAoConfig(_torchao_int8()), LoraTorchao),
}


def _torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)  # no hub: a local directory
    return path


def _load(model_dir, kind):
    config, _ = CONFIGS[kind]
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config(), device_map="cpu",
                                                             dtype=torch.float32)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_load_quantized_wrap_train_save_and_load(kind, model_dir, tmp_path):
    model = _load(model_dir, kind)
    prepare_for_training(model, gradient_checkpointing=True)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n or "lm_head" in n)
    peftcore.wrap(model, "lora", rank=8, targets="all-linear", dropout=0.05)
    layers = [m for m in model.modules() if isinstance(m, CONFIGS[kind][1])]
    assert len(layers) == 2 * 7  # every linear layer of both blocks (the head is left out)

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (4, 16))
    losses = train_steps(model, ids)  # an eval pass, then 12 steps
    assert losses[-1] < 0.9 * losses[0], losses

    with torch.no_grad():
        y = model(input_ids=ids).logits
    peftcore.save(model, tmp_path / "adapter")
    fresh = peftcore.load(_load(model_dir, kind), tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, y, rtol=0, atol=0)
