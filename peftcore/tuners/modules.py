"""Module kinds and a ready-made layer handler, for built-in methods and plugins alike.

A method that wraps modules into adapter layers registers one handler per module kind in the
``peftcore.layers`` entry-point group (see :class:`peftcore.tuners.base.LayerHandler`). Most
handlers are "this predicate, that layer class": :class:`Handler` is exactly that, and the
predicates below say which modules count as which kind::

    from peftcore.tuners.modules import Handler, is_linear

    LINEAR = Handler("torch.nn.Linear", is_linear, MyLayer, method="mine", linear_like=True)

Part of the plugin API (``peftcore.plugin.API_VERSION`` 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn


def plain_subclass(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls.forward`` (not a quantized or custom variant)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def is_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear``: not a subclass with its own forward (e.g. a quantized one), and not
    ``MultiheadAttention``'s ``out_proj``, whose weight the attention reads directly."""
    return plain_subclass(module, nn.Linear) and type(module).__name__ != "NonDynamicallyQuantizableLinear"


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2: a linear layer whose weight is stored ``(in, out)``),
    matched by name so that transformers is not imported here."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def is_conv(module: nn.Module) -> bool:
    """A plain ``nn.Conv1d/2d/3d`` with ``groups=1`` and zero padding."""
    if not any(plain_subclass(module, c) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return False
    return module.groups == 1 and module.padding_mode == "zeros"


@dataclasses.dataclass(frozen=True)
class Handler:
    """A :class:`peftcore.tuners.base.LayerHandler`: modules for which ``predicate`` holds are
    wrapped by ``layer(module)``.

    Attributes:
        kind: what it handles, in words (shown in errors and listings).
        predicate: ``module -> bool``.
        layer: the adapter layer class (or any callable ``module -> AdapterLayer``).
        method: the method it serves, e.g. ``"lora"``.
        linear_like: whether these modules count as linear layers (default targets, ``"all-linear"``).
        priority: handlers with a higher priority are asked first.
        peftcore_api: the plugin API version(s) the handler was built for (default 1, the
            version of the release that defined ``Handler``; an int or a tuple of ints).
    """

    kind: str
    predicate: Callable[[nn.Module], bool]
    layer: Callable[[nn.Module], Any]
    method: str
    linear_like: bool = False
    priority: int = 0
    peftcore_api: int = 1

    def matches(self, module: nn.Module) -> bool:
        return self.predicate(module)

    def wrap(self, module: nn.Module) -> Any:
        return self.layer(module)

    def describe(self) -> str:
        return self.kind
