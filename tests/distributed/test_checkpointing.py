"""Activation checkpointing with the fused LoRA op and dropout: the recomputed forward draws the
same masks, so gradients equal those of the run without checkpointing.

The op regenerates its dropout mask in backward from a seed drawn at forward from torch's
generator; torch.utils.checkpoint restores that generator before recomputing (its default
``preserve_rng_state=True``), which the last test shows is what keeps the masks equal.
"""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import peftcore
from peftcore.train.finetune import enable_checkpointing
from models import gpt2  # tests/models.py


def _cpp_available() -> bool:
    from peftcore.ops import dispatch

    try:
        dispatch.select("lora_linear", "cpu", "cpp")
        return True
    except peftcore.PeftcoreError:
        return False


pytestmark = pytest.mark.skipif(not _cpp_available(), reason="the C++ extension (cpp backend) is not built")


@pytest.fixture(scope="module")
def wrapped():
    model = peftcore.wrap(gpt2(), "lora", rank=4, dropout=0.3, backend="cpp", targets=["c_attn", "c_proj", "c_fc"])
    with torch.no_grad():  # non-zero B, so that every factor gets a gradient that depends on the mask
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


IDS = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))


def _blocks_forward(model, wrap_block=None):
    h = model.transformer.wte(IDS) + model.transformer.wpe(torch.arange(IDS.shape[1]))
    for block in model.transformer.h:
        call = lambda x, b=block: _first(b(x))  # noqa: E731
        h = call(h) if wrap_block is None else wrap_block(call, h)
    return model.lm_head(model.transformer.ln_f(h)).float().pow(2).mean()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _grads(model, loss_of):
    model = copy.deepcopy(model).train()
    torch.manual_seed(11)
    loss_of(model).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _max_diff(a, b):
    assert a.keys() == b.keys() and all(g is not None for g in a.values())
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_recomputes_the_same_masks(wrapped, reentrant):
    plain = _grads(wrapped, _blocks_forward)

    def ckpt(call, h):
        if reentrant and not h.requires_grad:
            h = h.detach().requires_grad_()  # reentrant checkpointing needs an input that requires grad
        return checkpoint(call, h, use_reentrant=reentrant)

    assert _max_diff(_grads(wrapped, lambda m: _blocks_forward(m, ckpt)), plain) == 0.0


@pytest.mark.parametrize("reentrant", [False, True])
def test_transformers_gradient_checkpointing_recomputes_the_same_masks(wrapped, reentrant):
    def loss(model):
        return model(input_ids=IDS, labels=IDS).loss

    plain = _grads(wrapped, loss)

    def checkpointed(model):
        if reentrant:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        else:
            enable_checkpointing(model)  # what peftcore finetune --gradient-checkpointing does
        return loss(model)

    assert _max_diff(_grads(wrapped, checkpointed), plain) <= 1e-6


def test_without_the_preserved_generator_the_masks_would_differ(wrapped):
    # The control: the equality above is not vacuous, the masks do depend on the restored state.
    plain = _grads(wrapped, _blocks_forward)
    unpreserved = _grads(wrapped, lambda m: _blocks_forward(m, lambda call, h: checkpoint(call, h, use_reentrant=False, preserve_rng_state=False)))
    assert _max_diff(unpreserved, plain) > 1e-4
