"""The DoRA adapter layer and the handlers that attach it to linear-like modules.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits the adapted weight
into a trained magnitude and a direction updated by LoRA, per output feature (a row of the
``(out, in)`` weight; a "column" in the paper's ``(in, out)`` layout):

    W' = m * V / ||V||,    V = W + s B A,    ||V|| = row-wise L2 norm, shape (out,)

with ``m`` initialised to ``||W||``, so ``W' = W`` at init. Shapes follow HF PEFT (``lora_A``
``(r, in)``, ``lora_B`` ``(out, r)``, ``lora_magnitude_vector`` ``(out,)``), so converting a saved
adapter is a renaming of keys.

Forward never materialises ``W'``: ``y = (m / ||V||) * (x W^T + s x A^T B^T) + b``, with ``||V||``
treated as a constant in backward, as the paper proposes (section 4.3: it saves the memory of
the norm's backward at no measurable cost in accuracy) and HF PEFT does.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterStateError
from peftcore.tuners.base import AdapterLayer
from peftcore.tuners.modules import Handler, is_hf_conv1d, is_linear

#: |m| below this cannot be divided back out of merged weights.
UNMERGE_MIN_ABS = 1e-12


def reference_dora_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scale: float
) -> torch.Tensor:
    """The adapted weight in plain PyTorch: the meaning the layer's forward and merge must reproduce.

    Args:
        weight: base weight, shape ``(out, in)``.
        A: down-projection, shape ``(r, in)``.
        B: up-projection, shape ``(out, r)``.
        magnitude: ``m``, shape ``(out,)``.
        scale: ``s`` = alpha / r.

    Returns:
        ``m * V / ||V||`` with ``V = W + s B A`` and row-wise norms, shape ``(out, in)``.
    """
    direction = weight + scale * (B @ A)  # (out, in)
    return (magnitude / direction.norm(p=2, dim=1))[:, None] * direction


class DoraLayer(AdapterLayer):
    """DoRA on ``nn.Linear`` or transformers ``Conv1D``; the original stays as ``base_layer``.

    A layer may hold several adapters, but at most one of them runs unmerged at a time: DoRA
    renormalises the whole weight, so two DoRA updates do not add up (:class:`DoraMethod`
    refuses to activate two; forward raises if it finds two running all the same).
    """

    method = "dora"
    supports_routing = True  # one adapter per example (model(..., adapter_names=[...])): routed_forward

    def __init__(self, base_layer: nn.Module, transposed: bool = False):
        super().__init__(base_layer)
        self.transposed = transposed  # Conv1D stores its weight as (in, out)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.dora_config: dict[str, Any] = {}
        # ||V|| at merge time, per merged adapter: unmerge needs it to undo the renormalisation.
        self.merged_norms: dict[str, torch.Tensor] = {}

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)``; a view of the stored tensor, so in-place ops write through."""
        weight = self.base_layer.weight
        return weight.t() if self.transposed else weight

    # -- adapters --------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, config: Any) -> None:
        if name in self.lora_A:
            raise AdapterStateError(f"this layer already holds a DoRA adapter named {name!r}")
        weight = self.base_weight()
        out_features, in_features = weight.shape
        factory = {"dtype": weight.dtype, "device": weight.device}
        A = torch.empty(config.rank, in_features, **factory)
        with torch.no_grad():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as LoRA: B = 0 makes the update zero at init
            magnitude = weight.detach().norm(p=2, dim=1)  # the same op forward uses, so m / ||V|| == 1 exactly
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(out_features, config.rank, **factory))
        self.lora_magnitude_vector[name] = nn.Parameter(magnitude)
        self.dora_config[name] = config

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.merged_adapters.remove(name)  # its update stays folded into the base weight
        self.merged_norms.pop(name, None)
        del self.lora_A[name]
        del self.lora_B[name]
        del self.lora_magnitude_vector[name]
        del self.dora_config[name]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {
            "lora_A": self.lora_A[name],
            "lora_B": self.lora_B[name],
            "lora_magnitude_vector": self.lora_magnitude_vector[name],
        }

    # -- forward -------------------------------------------------------------------------------------
    def weight_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` per output row for adapter ``name``, ``(out,)``, without autograd
        (a constant in backward, DoRA section 4.3)."""
        cfg = self.dora_config[name]
        A, B = self.lora_A[name], self.lora_B[name]
        weight = self.base_weight()
        with torch.no_grad():
            return (weight + (cfg.scale * (B @ A)).to(weight.dtype)).norm(p=2, dim=1)

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output, bias included (what routed rows without an adapter get)."""
        return self.base_layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:
            return routed_forward(self, x, self.routing)
        running = self.running_adapters()
        if not running:
            return self.base_layer(x)
        if len(running) > 1:
            raise AdapterStateError(f"DoRA adapters {list(running)} cannot run together on one layer; activate one")
        return self.adapter_forward(x, running[0])

    def adapter_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The layer's output with adapter ``name`` running (unmerged, the only one)."""
        cfg = self.dora_config[name]
        A, B, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name]
        weight = self.base_weight()  # (out, in)
        factor = (m / self.weight_norm(name)).to(x.dtype)  # (out,)
        h = F.dropout(x, cfg.dropout, self.training) if cfg.dropout > 0 else x
        y = F.linear(x, weight.to(x.dtype)) + cfg.scale * F.linear(F.linear(h, A), B)  # (*, out)
        y = factor * y
        bias = getattr(self.base_layer, "bias", None)
        return y if bias is None else y + bias

    # -- merge -------------------------------------------------------------------------------------
    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.base_layer.weight.dtype, torch.float32)

    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            return
        cfg, dtype = self.dora_config[name], self._compute_dtype()
        weight = self.base_weight()
        with torch.no_grad():
            A, B = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype)
            direction = weight.to(dtype) + cfg.scale * (B @ A)  # (out, in)
            norm = direction.norm(p=2, dim=1)
            factor = self.lora_magnitude_vector[name].to(dtype) / norm
            weight.copy_((factor[:, None] * direction).to(weight.dtype))
        self.merged_norms[name] = norm
        self.merged_adapters.append(name)

    def unmerge_problem(self, name: str) -> str | None:
        """Why adapter ``name`` cannot be unmerged (magnitudes too close to zero), or ``None``."""
        small = int((self.lora_magnitude_vector[name].detach().abs() < UNMERGE_MIN_ABS).sum())
        if small:
            return f"{small} entries of its magnitude vector are below {UNMERGE_MIN_ABS:g}, so the direction cannot be recovered"
        return None

    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            return
        problem = self.unmerge_problem(name)
        if problem:
            raise AdapterStateError(f"cannot unmerge DoRA adapter {name!r}: {problem}")
        cfg, dtype = self.dora_config[name], self._compute_dtype()
        weight = self.base_weight()
        with torch.no_grad():
            A, B = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype)
            norm = self.merged_norms[name].to(device=weight.device, dtype=dtype)
            factor = self.lora_magnitude_vector[name].to(dtype) / norm
            direction = weight.to(dtype) / factor[:, None]
            weight.copy_((direction - cfg.scale * (B @ A)).to(weight.dtype))
        del self.merged_norms[name]
        self.merged_adapters.remove(name)

    def extra_repr(self) -> str:
        ranks = {n: c.rank for n, c in self.dora_config.items()}
        return f"ranks={ranks}, active={list(self.active_adapters)}, merged={self.merged_adapters}"


# The layer handlers of entry-point group peftcore.layers (entries dora.<name>).
LINEAR = Handler("torch.nn.Linear", is_linear, DoraLayer, method="dora", linear_like=True)
HF_CONV1D = Handler("transformers Conv1D", is_hf_conv1d, functools.partial(DoraLayer, transposed=True), method="dora",
                    linear_like=True)


def routed_forward(layer: Any, x: torch.Tensor, routing: Any) -> torch.Tensor:
    """A DoRA layer's output when each example has its own adapter (or none), for plain and
    quantized DoRA layers alike (they provide ``base_output`` and ``weight_norm``).

    Each row gets ``base + (m/||V|| - 1) * (base - b) + (m/||V||) * s * dropout(x) A^T B^T`` with its
    adapter's ``m``, ``V``, ``A``, ``B`` (the single-adapter formula, rearranged around the base
    output as the quantized layers compute it); base rows get ``base``. One ``||V||`` per adapter
    of the batch; a loop over those adapters, each on its own rows.
    """
    names, rows_of = routing.plan_rows(layer.adapter_names(), x, f"a DoRA layer on {type(layer.base_layer).__name__}")
    base = layer.base_output(x)
    y = base.reshape(-1, base.shape[-1])  # (rows, out)
    x2 = x.reshape(-1, x.shape[-1])
    bias = getattr(layer.base_layer, "bias", None)
    out = y
    for name, rows in zip(names, rows_of):
        cfg = layer.dora_config[name]
        A, B, m = layer.lora_A[name], layer.lora_B[name], layer.lora_magnitude_vector[name]
        factor = m / layer.weight_norm(name)  # (out,), gradient to m only
        y_g = y.index_select(0, rows)
        unbiased = y_g if bias is None else y_g - bias.to(y_g.dtype)
        h = x2.index_select(0, rows)
        if layer.training and cfg.dropout > 0:
            h = F.dropout(h, cfg.dropout, True)
        low_rank = cfg.scale * F.linear(F.linear(h.to(A.dtype), A), B)
        out = out.index_copy(0, rows, (y_g + (factor - 1) * unbiased + factor * low_rank).to(out.dtype))
    return out.view(base.shape)
