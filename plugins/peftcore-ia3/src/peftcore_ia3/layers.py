"""The IA3 adapter layer and the handlers that attach it to linear-like modules.

One layer class serves ``nn.Linear`` (weight ``(out, in)``) and transformers' ``Conv1D``
(weight ``(in, out)``, GPT-2). Each adapter is one vector ``ia3_l[name]``:

=========================  ==================  ==========================  ==============================
kind                       ``ia3_l`` shape     forward                     merge
=========================  ==================  ==========================  ==============================
output (keys, values)      ``(e - s,)``        ``y[..., s:e] *= l``        rows ``s:e`` of W, b times ``l``
feed-forward (input)       ``(in,)``           ``y = base(x * l)``         columns of W times ``l``
=========================  ==================  ==========================  ==============================

``s:e`` is all outputs except for a packed q/k/v projection (GPT-2 ``c_attn``), where it is the
key and value part. Several active adapters multiply. Under per-example routing
(``model(..., adapter_names=[...])``, :mod:`peftcore.routing`) each row is scaled by its own
example's adapter only (base rows by nothing): the vectors are gathered per row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import nn

from peftcore.errors import AdapterStateError
from peftcore.tuners.base import AdapterLayer
from peftcore.tuners.modules import Handler, is_hf_conv1d, is_linear

#: |l| below this cannot be divided back out of merged weights.
UNMERGE_MIN_ABS = 1e-6


@dataclasses.dataclass(frozen=True)
class IA3Spec:
    """How one adapter scales one module (decided by :class:`~peftcore_ia3.method.IA3Method` from the path).

    Attributes:
        feedforward: scale the input (a feed-forward down projection) instead of the output.
        out_slice: ``(start, end)`` of the outputs to scale; ``None`` means all of them.
    """

    feedforward: bool = False
    out_slice: tuple[int, int] | None = None


class IA3Layer(AdapterLayer):
    """IA3 on ``nn.Linear`` or transformers ``Conv1D``; the original stays as ``base_layer``."""

    method = "ia3"
    supports_routing = True  # one adapter per example: _routed_forward

    def __init__(self, base_layer: nn.Module, transposed: bool = False):
        super().__init__(base_layer)
        self.transposed = transposed  # Conv1D stores its weight as (in, out)
        self.ia3_l = nn.ParameterDict()
        self.ia3_spec: dict[str, IA3Spec] = {}

    # -- geometry ------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)``; a view of the stored tensor, so in-place ops write through."""
        weight = self.base_layer.weight
        return weight.t() if self.transposed else weight

    def _span(self, spec: IA3Spec) -> tuple[int, int]:
        out_features = self.base_weight().shape[0]
        return spec.out_slice if spec.out_slice is not None else (0, out_features)

    # -- adapters --------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def add_adapter(self, name: str, config: Any) -> None:
        """Adds adapter ``name``; ``config`` is this module's :class:`IA3Spec`."""
        if name in self.ia3_l:
            raise AdapterStateError(f"this layer already holds an IA3 adapter named {name!r}")
        if not isinstance(config, IA3Spec):
            raise TypeError(f"IA3Layer.add_adapter expects an IA3Spec, got {type(config).__name__}")
        weight = self.base_weight()
        if config.feedforward:
            size = weight.shape[1]
        else:
            start, end = self._span(config)
            if not 0 <= start < end <= weight.shape[0]:
                raise AdapterStateError(f"IA3 output slice {config.out_slice} does not fit {weight.shape[0]} outputs")
            size = end - start
        # Ones: the adapted model equals the base model at init.
        self.ia3_l[name] = nn.Parameter(torch.ones(size, dtype=weight.dtype, device=weight.device))
        self.ia3_spec[name] = config

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.merged_adapters.remove(name)  # its scaling stays folded into the base weights
        del self.ia3_l[name]
        del self.ia3_spec[name]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    # -- forward -------------------------------------------------------------------------------------
    def _output_multiplier(self, names: list[str], dtype: torch.dtype) -> torch.Tensor:
        """Product of the output vectors of ``names``, padded with ones to all outputs, shape ``(out,)``."""
        out_features = self.base_weight().shape[0]
        total = None
        for name in names:
            start, end = self._span(self.ia3_spec[name])
            l = self.ia3_l[name].to(dtype)
            parts = [l.new_ones(start), l, l.new_ones(out_features - end)]
            full = torch.cat(parts) if (start, end) != (0, out_features) else l
            total = full if total is None else total * full
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:
            return self._routed_forward(x, self.routing)
        running = self.running_adapters()
        if not running:
            return self.base_layer(x)
        for name in running:
            if self.ia3_spec[name].feedforward:
                x = x * self.ia3_l[name].to(x.dtype)  # (*, in)
        y = self.base_layer(x)  # (*, out)
        outputs = [n for n in running if not self.ia3_spec[n].feedforward]
        if outputs:
            y = y * self._output_multiplier(outputs, y.dtype)
        return y

    def _routed_forward(self, x: torch.Tensor, routing: Any) -> torch.Tensor:
        """``base(x * l_in[row]) * l_out[row]`` with each row's own adapter's vectors (ones for base rows)."""
        names, index = routing.plan(self.adapter_names(), x, f"an IA3 layer on {type(self.base_layer).__name__}")
        row = index + 1  # row 0 of each table: ones (base rows, adapters this layer does not hold)
        inputs = [n for n in names if self.ia3_spec[n].feedforward]
        if inputs:
            ones = x.new_ones(x.shape[-1])
            table = torch.stack([ones] + [self.ia3_l[n].to(x.dtype) if n in inputs else ones for n in names])  # (G+1, in)
            x = (x.reshape(-1, x.shape[-1]) * table[row]).view(x.shape)
        y = self.base_layer(x)
        outputs = [n for n in names if not self.ia3_spec[n].feedforward]
        if outputs:
            ones = y.new_ones(y.shape[-1])
            table = torch.stack([ones] + [self._output_multiplier([n], y.dtype) if n in outputs else ones for n in names])  # (G+1, out)
            y = (y.reshape(-1, y.shape[-1]) * table[row]).view(y.shape)
        return y

    # -- merge -------------------------------------------------------------------------------------
    def _fold(self, name: str, inverse: bool) -> None:
        spec = self.ia3_spec[name]
        weight = self.base_weight()  # (out, in) view
        with torch.no_grad():
            l = self.ia3_l[name].detach().to(weight.dtype)

            def scale(t: torch.Tensor, factor: torch.Tensor) -> None:
                t.div_(factor) if inverse else t.mul_(factor)

            if spec.feedforward:
                scale(weight, l[None, :])  # columns: (x * l) W^T = x (W diag(l))^T
            else:
                start, end = self._span(spec)
                scale(weight[start:end], l[:, None])  # rows: y * l = x (diag(l) W)^T + b * l
                bias = getattr(self.base_layer, "bias", None)
                if bias is not None:
                    scale(bias[start:end], l.to(bias.dtype))

    def unmerge_problem(self, name: str) -> str | None:
        """Why adapter ``name`` cannot be unmerged (entries of ``l`` too close to zero), or ``None``."""
        small = int((self.ia3_l[name].detach().abs() < UNMERGE_MIN_ABS).sum())
        if small:
            return f"{small} entries of its vector are below {UNMERGE_MIN_ABS:g} in magnitude, so dividing them back out is not possible"
        return None

    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            return
        self._fold(name, inverse=False)
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            return
        problem = self.unmerge_problem(name)
        if problem:
            raise AdapterStateError(f"cannot unmerge IA3 adapter {name!r}: {problem}")
        self._fold(name, inverse=True)
        self.merged_adapters.remove(name)

    def extra_repr(self) -> str:
        kinds = {n: ("feedforward" if s.feedforward else f"output{list(s.out_slice) if s.out_slice else ''}") for n, s in self.ia3_spec.items()}
        return f"adapters={kinds}, active={list(self.active_adapters)}, merged={self.merged_adapters}"


# The layer handlers of entry-point group peftcore.layers (entries ia3.<name>).
LINEAR = Handler("torch.nn.Linear", is_linear, IA3Layer, method="ia3", linear_like=True)
HF_CONV1D = Handler("transformers Conv1D", is_hf_conv1d, functools.partial(IA3Layer, transposed=True), method="ia3",
                    linear_like=True)
