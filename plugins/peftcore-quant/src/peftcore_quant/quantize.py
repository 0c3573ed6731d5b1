"""Quantizing a model's linear layers in place, and preparing a quantized model for training.

``quantize_model`` is for models built or loaded in full precision (tests, the ``--quantize``
option of ``peftcore finetune``); models loaded by transformers with a ``BitsAndBytesConfig`` or a
``TorchAoConfig`` are quantized already. ``prepare_for_training`` does what QLoRA training needs
on either.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

import torch
from torch import nn

from peftcore.errors import ConfigError

KINDS = ("nf4", "fp4", "int8", "torchao-int8")


def _skipped(path: str, skip: tuple[str, ...]) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(leaf, p) for p in skip)


def quantize_model(
    model: nn.Module,
    kind: str,
    *,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    skip: tuple[str, ...] = ("lm_head", "classifier", "score", "head"),
) -> nn.Module:
    """Replaces every plain ``nn.Linear`` of ``model`` (except ``skip``) by a quantized one, in place.

    Args:
        model: a model in full precision on the CPU.
        kind: ``"nf4"``/``"fp4"`` (bitsandbytes ``Linear4bit``, blocks of 64), ``"int8"``
            (bitsandbytes ``Linear8bitLt``, one scale per output row, no outlier threshold), or
            ``"torchao-int8"`` (torchao ``Int8WeightOnlyConfig``: the module stays an ``nn.Linear``).
        compute_dtype: the 4-bit layers' compute dtype (the dtype of their matmul and output).
        double_quant: 4-bit: quantize the block scales too (QLoRA's double quantization).
        skip: path or leaf-name patterns left in full precision (the output head, by default).

    Returns:
        ``model`` (the same object).

    Raises:
        ConfigError: an unknown ``kind``.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    targets = [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and p and not _skipped(p, skip)]
    if kind == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        chosen = {id(m) for _, m in targets}
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in chosen)
        return model
    import bitsandbytes as bnb

    for path, linear in targets:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        has_bias = linear.bias is not None
        if kind == "int8":
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0)
            new.weight = bnb.nn.Int8Params(linear.weight.data.float().contiguous(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                    quant_type=kind, compress_statistics=double_quant)
            new.weight = bnb.nn.Params4bit(linear.weight.data.float().contiguous(), requires_grad=False, quant_type=kind,
                                           compress_statistics=double_quant, module=new)
        if has_bias:
            new.bias = nn.Parameter(linear.bias.data.float().clone(), requires_grad=False)
        new.to(linear.weight.device)  # bitsandbytes quantizes when the module is moved
        new.train(linear.training)
        setattr(parent, leaf, new)
    return model


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Readies a quantized model for LoRA training, in place (call it before ``peftcore.wrap``).

    * freezes every base parameter;
    * casts the parameters that are not quantized (norms, embeddings, the output head, biases)
      from fp16/bf16 to float32, for stable training (the quantized weights are untouched);
    * with ``gradient_checkpointing``: turns on the model's checkpointing (transformers models)
      and makes the input embeddings' output require grad, so checkpointed blocks get gradients
      although every base parameter is frozen.

    Args:
        model: a model whose linear layers are quantized (any of ``quantize_model``'s kinds, or
            loaded by transformers with a quantization config).
        gradient_checkpointing: see above.

    Returns:
        ``model``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if _is_plain(param) and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is not None:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _input_grads(model)
    return model


def _is_plain(param: torch.Tensor) -> bool:
    """A parameter stored in full precision (not bitsandbytes' or torchao's quantized storage)."""
    return type(param) in (nn.Parameter, torch.Tensor) and param.dtype.is_floating_point


def _input_grads(model: nn.Module) -> None:
    enable: Callable[[], None] | None = getattr(model, "enable_input_require_grads", None)
    if enable is not None:
        enable()
        return
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        embeddings[0].register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
