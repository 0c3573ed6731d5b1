"""The adapter layer: a module whose output gets bottleneck adapters added to it.

:class:`BottleneckLayer` stands where the target module stood and keeps it as ``base_layer``.
Its forward runs the target, then adds every running adapter's output::

    y = target(*args, **kwargs)                                     # (*, N)
    out = y + sum(scale * up(act(down(y))) for sequential adapters)    # Houlsby, Pfeiffer
            + sum(scale * up(act(down(x))) for parallel adapters)      # x: the FFN block's input

so several running adapters add up, each reading the same ``y`` (or ``x``). Each adapter lives in
``bottleneck[name]`` (a :class:`Bottleneck`: ``down`` (r, K) and ``up`` (N, r) linear layers whose
parameters the op reads; ``up`` starts at zero, so a new adapter changes nothing).

A parallel adapter needs the input of another module (the FFN block, e.g. ``mlp``), which runs
before the target (e.g. ``mlp.down_proj``). The layer reads it with a forward pre-hook on that
module: the hook is a bound method of this layer and the module is held in a plain list, so deep
copies and pickles of the model carry both along consistently. The hook is registered by
:meth:`connect_input` and removed by :meth:`disconnect_input` (``unwrap``/``delete``); a failed
``wrap`` is undone by the lifecycle's snapshot, which restores the module's hook dictionaries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftcore.errors import AdapterStateError, PeftcoreError
from peftcore.ops import dispatch
from peftcore.ops.bottleneck import OP, bottleneck
from peftcore.tuners.adapter.config import AdapterConfig
from peftcore.tuners.base import AdapterLayer


class Bottleneck(nn.Module):
    """The parameters of one adapter: ``down`` (K -> r, default Linear init) and ``up`` (r -> N, zero)."""

    def __init__(self, in_features: int, size: int, out_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.down = nn.Linear(in_features, size, dtype=dtype, device=device)
        self.up = nn.Linear(size, out_features, dtype=dtype, device=device)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The module's main input: the first positional argument, else ``hidden_states``, else the first tensor kwarg."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


class BottleneckLayer(AdapterLayer):
    """Adds bottleneck adapters to the output of the module it wraps.

    Attributes:
        bottleneck: ``name -> Bottleneck`` with each adapter's parameters.
        adapter_config: ``name -> AdapterConfig``.
        path: the layer's path in the model (for error messages).
        input_path: the module whose input parallel adapters read (``None``: no parallel adapter;
            equal to ``path``: this layer's own input).
    """

    method = "adapter"
    supports_routing = True  # one adapter per example: _routed

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer)
        self.bottleneck = nn.ModuleDict()
        self.adapter_config: dict[str, AdapterConfig] = {}
        self.path = path
        self.input_path: str | None = None
        # [module whose input is read, id of the pre-hook on it]; a list so that nn.Module does not
        # register the module as a child of this layer.
        self._input_hook: list[Any] = []
        # The op's kernel per (backend, device type, dtype), resolved once rather than at every
        # forward (dispatch.select reads PEFTCORE_BACKEND and the registry); see docs/kernels.md.
        self._kernels = dispatch.KernelCache(OP)

    # -- adapters ---------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.bottleneck.keys())

    def add_adapter(self, name: str, config: Any, in_features: int, out_features: int) -> None:  # type: ignore[override]
        """Adds adapter ``name`` reading ``in_features`` and writing ``out_features`` (the method
        reads both from the model: see :mod:`peftcore.tuners.adapter.families`)."""
        if name in self.bottleneck:
            raise AdapterStateError(f"{self.path or 'this layer'} already holds an adapter named {name!r}")
        dispatch.check_backend(OP, config.backend, "adapter backend")
        reference = next(self.base_layer.parameters(), None)
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.get_default_dtype()
        device = reference.device if reference is not None else torch.device("cpu")
        self.bottleneck[name] = Bottleneck(in_features, config.size, out_features, dtype, device)
        self.adapter_config[name] = config
        try:  # resolved now, so that torch.compile finds it in the cache (see LoraLinear.add_adapter)
            self._kernels(config.backend, device.type, dtype)
        except PeftcoreError:
            pass  # a backend that cannot run here (yet) is reported at forward

    def remove_adapter(self, name: str) -> None:
        del self.bottleneck[name]
        del self.adapter_config[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)
        if not any(c.parallel for c in self.adapter_config.values()):
            self.disconnect_input()

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        block = self.bottleneck[name]
        return {
            "bottleneck.down.weight": block.down.weight,
            "bottleneck.down.bias": block.down.bias,
            "bottleneck.up.weight": block.up.weight,
            "bottleneck.up.bias": block.up.bias,
        }

    # -- the parallel adapters' input -----------------------------------------------------------------
    def connect_input(self, input_path: str, module: nn.Module) -> None:
        """Makes parallel adapters read the input of ``module`` (at ``input_path``), or, for
        ``input_path == self.path``, this layer's own input."""
        if self.input_path is not None:
            if self.input_path != input_path:
                raise AdapterStateError(
                    f"parallel adapters at {self.path!r} already read the input of {self.input_path!r}, not {input_path!r}"
                )
            return
        self.input_path = input_path
        if input_path != self.path:
            handle = module.register_forward_pre_hook(self._capture_input, with_kwargs=True)
            self._input_hook = [module, handle.id]

    def disconnect_input(self) -> None:
        """Removes the pre-hook that :meth:`connect_input` registered (if any)."""
        if self._input_hook:
            module, hook_id = self._input_hook
            # By id rather than through a RemovableHandle: a handle keeps a weak reference to the
            # original's hook dict, so after a deepcopy it would remove the original's hook.
            module._forward_pre_hooks.pop(hook_id, None)
            module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        self._input_hook = []
        self.input_path = None
        self.__dict__.pop("_captured", None)

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Kept only until this layer's next forward (which runs right after, inside the block).
        self.__dict__["_captured"] = _first_tensor(args, kwargs)

    def _parallel_input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        captured = self.__dict__.pop("_captured", None)
        if self.input_path is None or self.input_path == self.path:
            return _first_tensor(args, kwargs)
        return captured

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x_parallel = self._parallel_input(args, kwargs)
        output = self.base_layer(*args, **kwargs)
        running = self.running_adapters()
        if not running and self.routing is None:
            return output
        y = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(y, torch.Tensor):
            raise AdapterStateError(
                f"the adapter at {self.path!r} needs its module to return a tensor (or a tuple starting with one), "
                f"got {type(output).__name__}; target another module"
            )
        if self.routing is not None:  # the batch's adapters that this layer holds, each on its own rows
            running, rows_of = self.routing.plan_rows(self.adapter_names(), y, f"the adapter layer at {self.path!r}")
            if not running:
                return output
            rows_of = dict(zip(running, rows_of))
        # One dtype for the op: the output's (under autocast the op casts everything to the
        # autocast dtype itself, as nn.Linear does).
        dtype = y.dtype
        if x_parallel is not None and x_parallel.dtype != dtype:
            x_parallel = x_parallel.to(dtype)
        result = None
        for name in running:
            cfg, block = self.adapter_config[name], self.bottleneck[name]
            W_down, b_down, W_up, b_up = (p if p.dtype == dtype else p.to(dtype)
                                          for p in (block.down.weight, block.down.bias, block.up.weight, block.up.bias))
            if cfg.parallel:
                if x_parallel is None:
                    raise AdapterStateError(
                        f"the parallel adapter {name!r} at {self.path!r} reads the input of {self.input_path!r}, "
                        "which did not run before it in this forward pass; call the model (or that module), "
                        "not this layer alone"
                    )
                x = x_parallel
            else:
                x = y
            if self.routing is not None:  # one adapter per example: this adapter on its own rows
                result = self._routed(name, rows_of[name], x, y, result, (W_down, b_down, W_up, b_up))
                continue
            residual = None if (result is None and x is y) else (y if result is None else result)
            result = bottleneck(x, W_down, b_down, W_up, b_up, cfg.scale, cfg.activation, residual,
                                backend=cfg.backend, cache=self._kernels)
        if isinstance(output, tuple):
            return (result, *output[1:])
        if isinstance(output, list):
            return [result, *output[1:]]
        return result

    def _routed(self, name: str, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor, result: torch.Tensor | None,
                weights: tuple) -> torch.Tensor:
        """``result`` (``y`` at first) with ``rows`` (those routed to ``name``) replaced by ``y + adapter(x)`` there."""
        cfg = self.adapter_config[name]
        out = (y if result is None else result).reshape(-1, y.shape[-1])
        x_g = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        y_g = y.reshape(-1, y.shape[-1]).index_select(0, rows)
        new = bottleneck(x_g, *weights, cfg.scale, cfg.activation, None if x is y else y_g, backend=cfg.backend, cache=self._kernels)
        return out.index_copy(0, rows, new).view(y.shape)

    def extra_repr(self) -> str:
        sizes = {n: (c.size, c.placement) for n, c in self.adapter_config.items()}
        return f"adapters={sizes}, active={list(self.active_adapters)}"
