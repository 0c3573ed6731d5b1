"""Tiny models for the plugin's tests (sizes bitsandbytes' CPU kernels accept: multiples of 64), and the
requantization bound the merge tests check."""

from __future__ import annotations

import torch
import transformers

from peftcore_quant import quantize_model


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny random Llama (hidden 64, 2 blocks, vocabulary 128), the same for the same seed, eval mode."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


def quantized_llama(kind: str, seed: int = 0, cpu_repack: bool = False) -> transformers.LlamaForCausalLM:
    """``tiny_llama(seed)`` quantized by ``quantize_model(model, kind)``.

    ``cpu_repack=False`` turns off bitsandbytes' AVX512-BF16 inference path for 4-bit layers: on
    the first eval forward without autograd it repacks the weight in place and drops the double
    quantization of the scales, so the base model's state dict changes under a mere forward
    (the kit's ``unwrap`` check compares state dicts before and after).
    """
    model = quantize_model(tiny_llama(seed), kind)
    if not cpu_repack:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def half_step(base: torch.nn.Module) -> torch.Tensor:
    """Per element of a bitsandbytes layer's (merged) weight, half the largest gap between adjacent
    levels times its scale: the most that rounding to the nearest level moves it (the bound
    docs/quantization.md states), ``(out, in)``."""
    import bitsandbytes.functional as bF

    from peftcore_quant.layers import int8_weight

    if type(base).__name__ == "Linear8bitLt":
        CB, SCB = int8_weight(base)
        return (0.5 / 127.0) * SCB.float()[:, None].expand(CB.shape)
    state = base.weight.quant_state
    levels = state.code.float().sort().values
    half_gap = 0.5 * (levels[1:] - levels[:-1]).max()
    absmax = bF.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax.float()
    return half_gap * absmax.repeat_interleave(state.blocksize)[: state.shape.numel()].view(state.shape)


def train_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int = 12, lr: float = 1e-2) -> list[float]:
    """A user's loop: one eval pass first (as a validation pass does: bitsandbytes then repacks
    4-bit weights for its CPU inference kernel), then ``steps`` AdamW steps on the causal-LM loss
    of ``ids`` over the trainable parameters; the losses, and the model left in eval mode."""
    with torch.no_grad():
        model.eval()(input_ids=ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses
