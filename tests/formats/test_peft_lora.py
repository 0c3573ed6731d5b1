"""HF PEFT's LoRA/DoRA format <-> peftcore, against the real ``peft`` package.

The matrix: PEFT -> peftcore (``PeftModel.save_pretrained``, then ``peftcore.load``), peftcore ->
PEFT (``peftcore.save``, then ``PeftModel.from_pretrained``) and peftcore -> PEFT -> peftcore, on
MiniLM sequence classification, a tiny GPT-2 (Conv1D, fan_in_fan_out, wte embedding), a tiny
Llama with grouped-query attention (and its ``score`` head) and a small Conv2d model; outputs
compared in fp32 within 1e-5.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftcore
from models import gpt2, llama, minilm, minilm_inputs, output_of, token_inputs
from peftcore.errors import CheckpointError
from test_lifecycle import _assert_unchanged, _fingerprint

peft = pytest.importorskip("peft")

TOL = {"rtol": 0, "atol": 1e-5}


class ConvNet(nn.Module):
    """A small image model: LoRA on Conv2d layers and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(pixels))))  # (B, 8, H', W')
        return self.head(h.mean(dim=(2, 3)))  # (B, 4)


def convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def llama_seq_cls(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def _image_inputs() -> dict:
    return {"pixels": torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))}


def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


MODELS = {
    "gpt2": (gpt2, token_inputs),
    "llama": (llama, token_inputs),
    "llama_cls": (llama_seq_cls, token_inputs),
    "minilm": (minilm, minilm_inputs),
    "conv": (convnet, _image_inputs),
}


def _randomise(model: nn.Module, seed: int = 5, scale: float = 0.2) -> None:
    """Non-zero LoRA factors (and a moved head), so that a wrong key, scale or rank shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or (p.requires_grad and ("score" in name or "classifier" in name)):
                p.add_(scale * torch.randn(p.shape, generator=g))


def peft_saved(family: str, directory: Path, **options) -> tuple[nn.Module, Path, torch.Tensor]:
    """A base model, and PEFT's LoRA on a copy of it, randomised and saved by PEFT; with PEFT's outputs."""
    factory, inputs = MODELS[family]
    base = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
        _randomise(model)
        model.eval()
        model.save_pretrained(str(directory))
    return base, directory, _out(model, inputs())


def peft_loaded(base: nn.Module, directory: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


# -- PEFT -> peftcore ---------------------------------------------------------------------------------
READ_CASES = {
    "gpt2-list-embedding": ("gpt2", dict(target_modules=["c_attn", "c_proj", "wte"], r=4, lora_alpha=16)),
    "gpt2-regex-rslora": ("gpt2", dict(target_modules=r".*\.h\.1\.(attn\.c_attn|mlp\.c_fc)", r=8, lora_alpha=4,
                                       use_rslora=True)),
    "llama-patterns": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                                     rank_pattern={"k_proj": 2, "model.layers.1.self_attn.o_proj": 6},
                                     alpha_pattern={"layers.1.self_attn.q_proj": 3, "v_proj": 12})),
    "llama-layers": ("llama", dict(target_modules=["q_proj", "v_proj", "gate_proj"], layers_to_transform=[1],
                                   layers_pattern="layers", r=2, lora_dropout=0.1)),
    "llama-score-head": ("llama_cls", dict(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], r=4)),
    "conv2d": ("conv", dict(target_modules=["conv1", "conv2", "head"], r=2, lora_alpha=4)),
}


@pytest.mark.parametrize("case", list(READ_CASES))
def test_peft_lora_loads_with_peft_outputs(tmp_path, case):
    family, options = READ_CASES[case]
    base, directory, expected = peft_saved(family, tmp_path / "peft", **options)
    model = peftcore.load(copy.deepcopy(base), directory)
    torch.testing.assert_close(_out(model, MODELS[family][1]()), expected, **TOL)
    # and the adapter trains what PEFT trains: the factors, plus the head under modules_to_save
    record = peftcore.adapters(model)["default"]
    assert record.method == "lora"
    if family == "llama_cls":
        assert peftcore.lifecycle.get_state(model).adapters["default"].trainable == ["score"]


def test_minilm_classifier_peft_to_peftcore_to_peft(tmp_path):
    """MiniLM sequence classification (the classifier under modules_to_save), both ways."""
    base, directory, expected = peft_saved("minilm", tmp_path / "peft", task_type="SEQ_CLS", r=4, lora_alpha=8,
                                           target_modules=["query", "value", "dense"])
    inputs = minilm_inputs()
    model = peftcore.load(copy.deepcopy(base), directory)
    torch.testing.assert_close(output_of(model, inputs), expected, **TOL)
    assert peftcore.lifecycle.get_state(model).adapters["default"].trainable == ["classifier"]
    out = peftcore.save(model, tmp_path / "back")
    torch.testing.assert_close(output_of(peft_loaded(base, out), inputs), expected, **TOL)


def test_dora_loads_through_the_plugin(tmp_path):
    pytest.importorskip("peftcore_dora")
    base, directory, expected = peft_saved("gpt2", tmp_path / "peft", target_modules=["c_attn", "c_fc"], r=4,
                                           lora_alpha=8, use_dora=True)
    model = peftcore.load(copy.deepcopy(base), directory)
    assert peftcore.adapters(model)["default"].method == "dora"
    torch.testing.assert_close(output_of(model, token_inputs()), expected, **TOL)


# -- peftcore -> PEFT, and back ------------------------------------------------------------------------
WRITE_CASES = {
    "gpt2-embedding": ("gpt2", "lora", dict(rank=4, targets=["c_attn", "c_proj", "wte"])),
    "llama-patterns-rslora": ("llama", "lora", dict(rank=4, alpha=6, rslora=True, targets=["q_proj", "k_proj", "o_proj"],
                                                    rank_pattern={"k_proj": 2}, alpha_pattern={"layers\\.1\\..*": 3.0})),
    "llama-score-head": ("llama_cls", "lora", dict(rank=2, targets=["q_proj", "v_proj"], trainable=["score"],
                                                   dropout=0.1, backend="reference", init="gaussian")),
    "conv2d": ("conv", "lora", dict(rank=2, targets=["conv1", "conv2", "head"])),
    "llama-dora": ("llama", "dora", dict(rank=4, alpha=8, targets=["q_proj", "v_proj"])),
    "minilm-classifier": ("minilm", "lora", dict(rank=4, targets=["query", "value"], trainable=["classifier"])),
}


@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_peftcore_adapter_saved_by_default_in_peft_format_loads_in_peft_and_back(tmp_path, case):
    family, method, options = WRITE_CASES[case]
    if method == "dora":
        pytest.importorskip("peftcore_dora")
    factory, make_inputs = MODELS[family]
    base, inputs = factory(), make_inputs()
    model = peftcore.wrap(copy.deepcopy(base), method, **options)
    _randomise(model)
    expected = _out(model, inputs)
    directory = peftcore.save(model, tmp_path / "a")  # the default: PEFT's format
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (method == "dora")
    torch.testing.assert_close(_out(peft_loaded(base, directory), inputs), expected, **TOL)
    # peftcore -> PEFT -> peftcore: same outputs, the same options (peftcore's own ride in "peftcore")
    again = peftcore.load(copy.deepcopy(base), directory)
    torch.testing.assert_close(_out(again, inputs), expected, rtol=0, atol=0)
    saved, loaded = peftcore.lifecycle.get_state(model).adapters["default"], peftcore.lifecycle.get_state(again).adapters["default"]
    assert loaded.config == saved.config and loaded.targets == saved.targets and loaded.trainable == saved.trainable
    assert loaded.provider == saved.provider


def test_peft_saved_adapter_round_trips_through_peftcore_unchanged(tmp_path):
    """PEFT -> peftcore -> PEFT: PEFT gets the same outputs from the rewritten directory."""
    base, directory, expected = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj", "v_proj", "embed_tokens"],
                                           r=4, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 2})
    model = peftcore.load(copy.deepcopy(base), directory)
    out = peftcore.save(model, tmp_path / "back", format="peft")
    torch.testing.assert_close(_out(peft_loaded(base, out), token_inputs()), expected, **TOL)


def test_peft_format_files(tmp_path):
    model = peftcore.wrap(gpt2(), "lora", rank=4, targets=["c_attn", "wte"], backend="reference")
    directory = peftcore.save(model, tmp_path / "a", name="default")
    assert sorted(p.name for p in directory.iterdir()) == ["SHA256SUMS", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(directory / "adapter_model.safetensors")
    assert set(tensors) == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{x}.weight" for i in (0, 1) for x in "AB"
    } | {"base_model.model.transformer.wte.lora_embedding_A", "base_model.model.transformer.wte.lora_embedding_B"}
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] is True and config["bias"] == "none"
    extra = config["peftcore"]
    assert extra["method"] == "lora" and extra["options"] == {"init": "default", "backend": "reference"}
    assert extra["provider"]["distribution"] == "peftcore" and extra["target_kinds"]["transformer.wte"] == "embedding"


# -- the default format, and what PEFT's format cannot hold --------------------------------------------
def test_default_is_native_where_peft_cannot_hold_the_adapter(tmp_path):
    model = peftcore.wrap(llama(), "lora", rank=2, init="pissa", targets=["q_proj"])
    directory = peftcore.save(model, tmp_path / "pissa")
    assert json.loads((directory / "adapter_config.json").read_text())["format"] == "peftcore-adapter"
    with pytest.raises(CheckpointError, match="init='pissa'.*format='peftcore'"):
        peftcore.save(model, tmp_path / "pissa-peft", format="peft")
    assert not (tmp_path / "pissa-peft").exists()


def test_bottleneck_adapter_stays_native(tmp_path):
    model = peftcore.wrap(minilm(), "adapter")
    directory = peftcore.save(model, tmp_path / "bottleneck")
    assert json.loads((directory / "adapter_config.json").read_text())["method"] == "adapter"
    with pytest.raises(CheckpointError, match="cannot hold a 'adapter' adapter.*format='peftcore'"):
        peftcore.save(model, tmp_path / "b-peft", format="peft")
    with pytest.raises(CheckpointError, match="unknown adapter format 'hf'"):
        peftcore.save(model, tmp_path / "b-hf", format="hf")


# -- refusals: named, listed, model unchanged -------------------------------------------------------
def _edited(directory: Path, config_changes: dict | None = None, extra_tensors: dict | None = None) -> Path:
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if extra_tensors:
        tensors = load_file(directory / "adapter_model.safetensors")
        tensors.update(extra_tensors)
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def _expect_refusal(base: nn.Module, directory: Path, match: str) -> None:
    model = copy.deepcopy(base)
    fingerprint = _fingerprint(model)
    with pytest.raises(CheckpointError, match=match):
        peftcore.load(model, directory)
    _assert_unchanged(model, fingerprint)


@pytest.mark.parametrize("changes, match", [
    ({"peft_type": "LOHA"}, "peft_type 'LOHA'.*reads LORA, IA3, PROMPT_TUNING, PREFIX_TUNING"),
    ({"bias": "all"}, "bias='all' is not supported.*reads bias='none'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported.*reads True, False, 'gaussian'"),
    ({"layer_replication": [[0, 1]]}, "sets 'layer_replication'.*does not implement; it reads the options peft_type"),
    ({"r": 3}, "rank 4.*r=3 and rank_pattern=\\{\\} give it rank 3"),
])
def test_unsupported_peft_lora_is_refused_and_the_model_unchanged(tmp_path, changes, match):
    base, directory, _ = peft_saved("gpt2", tmp_path / "peft", target_modules=["c_attn"], r=4)
    _expect_refusal(base, _edited(directory, changes), match)


def test_lora_bias_tensor_is_refused(tmp_path):
    base, directory, _ = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj"], r=4)
    bias = {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(32)}
    _expect_refusal(base, _edited(directory, {"lora_bias": True}), "sets 'lora_bias'")
    _expect_refusal(base, _edited(directory, {"lora_bias": False}, bias), "lora_bias and trainable tokens are not supported")


def test_dora_without_the_plugin_names_it(tmp_path, monkeypatch):
    base, directory, _ = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj"], r=4, use_dora=True)
    monkeypatch.setenv("PEFTCORE_DISABLE_PLUGINS", "1")
    _expect_refusal(base, directory, "use_dora=True needs peftcore's dora method from the plugin peftcore-dora.*pip install peftcore-dora")


def test_a_changed_base_embedding_copy_is_refused(tmp_path):
    """PEFT saves an adapted embedding's whole weight; a copy that is not this model's is refused."""
    base, directory, expected = peft_saved("llama", tmp_path / "peft", target_modules=["embed_tokens", "q_proj"], r=2)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(directory / "adapter_model.safetensors")
    torch.testing.assert_close(output_of(peftcore.load(copy.deepcopy(base), directory), token_inputs()), expected, **TOL)
    _expect_refusal(llama(seed=1), directory, "full copy of the base weight 'model.embed_tokens.weight'.*holds other values")


def test_peft_directory_for_another_architecture_is_refused(tmp_path):
    _, directory, _ = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj"], r=4)
    _expect_refusal(gpt2(), directory, "targets modules this GPT2LMHeadModel lacks: model.layers.0.self_attn.q_proj, "
                    "model.layers.1.self_attn.q_proj \\(saved from transformers.models.llama.modeling_llama.LlamaForCausalLM\\)")


def test_methods_peft_holds_with_loss_stay_native_by_default(tmp_path):
    """Prompt tuning converts to PEFT's format (format="peft"), but not every option survives: native by default."""
    model = peftcore.wrap(gpt2(), "prompt", virtual_tokens=2)
    directory = peftcore.save(model, tmp_path / "prompt")
    assert json.loads((directory / "adapter_config.json").read_text())["method"] == "prompt"
    directory = peftcore.save(model, tmp_path / "prompt-peft", format="peft")
    assert json.loads((directory / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"


def test_a_pickled_peft_adapter_is_named(tmp_path):
    base, directory, _ = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj"], r=2)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    _expect_refusal(base, directory, "only adapter_model.bin, a pickle, which peftcore does not read")


def test_modules_to_save_follow_peft_suffix_rule(tmp_path):
    """PEFT wraps every module whose name ends with a modules_to_save entry (DistilBERT's
    pre_classifier for "classifier"); each becomes a trainable= module of its own."""
    from peftcore.formats import peft_lora

    tensors = {
        "base_model.model.layer.lora_A.weight": torch.zeros(2, 4), "base_model.model.layer.lora_B.weight": torch.zeros(3, 2),
        "base_model.model.pre_classifier.weight": torch.ones(4, 4), "base_model.model.classifier.weight": torch.ones(2, 4),
    }
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["layer"], "modules_to_save": ["classifier"]}
    native, native_tensors = peft_lora.to_native(None, config, tensors, "memory")
    assert sorted(native["trainable"]) == ["classifier", "pre_classifier"]
    assert native["trainable_keys"] == ["classifier.weight", "pre_classifier.weight"]
    assert set(native_tensors) == {"layer.lora_A", "layer.lora_B", "classifier.weight", "pre_classifier.weight"}
