"""Mixed precision: bf16 or fp16 autocast, and dynamic loss scaling for fp16.

fp16 has 5 exponent bits: gradients below about 6e-8 flush to zero and activations above 65504
overflow. Loss scaling (``torch.amp.GradScaler``) multiplies the loss before ``backward`` so
small gradients stay representable, unscales them before clipping and the optimizer step, and
skips every step whose gradients hold an inf or NaN (then halves the scale); after
``growth_interval`` clean steps it doubles the scale again. bf16 has fp32's exponent range and
needs no scaling. The parameters stay float32 in both cases (autocast casts per op).

Example (what :func:`peftcore.train.train_epoch` does with ``fp16=True``)::

    scaler = make_scaler(model, fp16=True)
    with autocast(model, "fp16"):
        loss = loss_fn(model, batch)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)                 # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    applied = scaler_step(scaler, optimizer)   # False: skipped (inf/NaN), the scale was lowered
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from peftcore.errors import ConfigError

#: Precision names and the autocast dtype of each (``None``: no autocast).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(bf16: bool = False, fp16: bool = False) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` from the two flags.

    Raises:
        ConfigError: both flags are set.
    """
    if bf16 and fp16:
        raise ConfigError("--bf16 and --fp16 exclude each other; pass one")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def device_type(model: nn.Module) -> str:
    """The device type of the model's first parameter (``"cpu"`` for a model without any)."""
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def autocast(model: nn.Module, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the precision's dtype on the model's device type; a no-op for ``"fp32"``.

    Raises:
        ConfigError: an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type(model), dtype=dtype)


def make_scaler(model: nn.Module, fp16: bool, *, init_scale: float = 2.0**16, growth_interval: int = 2000) -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` on the model's device type for fp16, else ``None``.

    Args:
        init_scale: the first loss scale (torch's default, 2**16).
        growth_interval: clean steps before the scale doubles (torch's default, 2000).
    """
    if not fp16:
        return None
    return torch.amp.GradScaler(device_type(model), init_scale=init_scale, growth_interval=growth_interval)


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step(optimizer)`` then ``scaler.update()``; whether the step was applied.

    A step is skipped when the (unscaled) gradients hold an inf or NaN; the scaler then lowers
    its scale, which is how the skip is detected (``GradScaler`` has no public flag for it).
    """
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before
