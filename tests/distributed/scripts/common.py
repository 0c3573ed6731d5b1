"""Shared by the scripts that tests/distributed runs under torch's launcher (2 ranks, gloo)."""

import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gpt2(seed: int = 0, dropout: float = 0.0):
    """A tiny GPT-2 (2 blocks, hidden 32, vocabulary 128) with its own dropout set to ``dropout``."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, loss_type="ForCausalLM")
    return GPT2LMHeadModel(config)


def token_batches(steps: int, rows: int, length: int = 8, seed: int = 1):
    """``steps`` global batches of ``rows`` random token sequences (Batch objects; labels = ids)."""
    from peftcore.train.data import Batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 128, (rows, length), generator=g)
        out.append(Batch({"input_ids": ids}, ids))
    return out


def lm_loss(model, batch):
    return model(**batch.inputs, labels=batch.labels).loss


def adapter_params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def report(**result) -> None:
    """Rank 0 prints one ``RESULT {json}`` line for the test to read."""
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
