"""Per-example adapter routing: many adapters in one batch.

``model(..., adapter_names=[...])`` (forward and, for transformers models, ``generate``) and
``with peftcore.route(model, names):`` give each example of the batch its own adapter, or none
(:data:`BASE`). The names travel as a :class:`Routing` that :func:`route` hands to every adapter
layer of the model that can route (a layer class with ``supports_routing = True``) for the
duration of the call; the layers read it from their ``routing`` attribute in forward. Nothing is
copied from transformers: a forward pre-hook on the wrapped model takes ``adapter_names`` out of
the keyword arguments, and ``generate`` is wrapped the way ``save_pretrained`` is
(an instance attribute, see :mod:`peftcore.integrations.transformers`).

A routed call runs each example through its own adapter and ignores the active set. It is
refused, before anything runs, when a name is unknown, an adapter is merged, the adapters are
disabled, a routed adapter's method cannot route, or an active adapter of a method that cannot
route would apply to every row; a batch whose size differs from the number of names is refused
at the first layer, and names that no layer read are an error after the call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from peftcore.errors import AdapterNotFoundError, AdapterStateError, ConfigError

#: The name that routes an example to the base model (no adapter), as in HF PEFT.
BASE = "__base__"

KWARG = "adapter_names"
_GENERATE = "generate"


class Routing:
    """The adapter of each example of one call, as adapter layers read it.

    Args:
        names: one adapter name (or :data:`BASE`) per example.
        expand: accept batches of ``k * len(names)`` examples, each name standing for ``k``
            consecutive examples (``generate`` with beams or several sequences per prompt).

    Attributes:
        groups: the distinct adapters of the batch, in first-seen order.
        used: whether a layer has read the routing.
    """

    def __init__(self, names: Sequence[str], expand: bool = False):
        self.names = tuple(names)
        self.groups = tuple(dict.fromkeys(n for n in self.names if n != BASE))
        position = {n: g for g, n in enumerate(self.groups)}
        self.example_group = [position.get(n, -1) for n in self.names]
        self.expand = expand
        self.used = False
        self._plans: dict[tuple, tuple[list[str], torch.Tensor]] = {}
        self._rows: dict[int, list[torch.Tensor]] = {}  # plan_rows: id of the plan's index -> rows

    def examples_per_name(self, batch: int, where: str) -> int:
        """How many examples of a batch of ``batch`` each name stands for (1 unless ``expand``).

        Raises:
            ConfigError: the batch does not match the names.
        """
        n = len(self.names)
        if batch == n:
            return 1
        if self.expand and batch % n == 0:
            return batch // n
        raise ConfigError(
            f"adapter_names has {n} names but {where} got a batch of {batch} examples; give one name per "
            f"example (use {BASE!r} for examples that should run without adapter)"
        )

    def plan(self, held: Sequence[str], x: torch.Tensor, where: str) -> tuple[list[str], torch.Tensor]:
        """The adapters one layer runs for ``x`` and each row's position among them.

        Args:
            held: the adapter names the layer holds.
            x: the layer's input; dimension 0 is the batch, every other dimension but the last
                makes rows (``(B, T, K)`` gives ``B * T`` rows).
            where: how messages name the layer.

        Returns:
            ``(names, index)``: the routed adapters this layer holds, and a ``(rows,)`` int64
            tensor on ``x``'s device with each row's position in ``names`` (``-1``: base output,
            also for examples routed to an adapter this layer does not hold).
        """
        self.used = True
        if x.dim() < 2:
            raise ConfigError(f"adapter_names needs a batch dimension, but {where} got an input of shape {tuple(x.shape)}")
        batch = x.shape[0]
        rows = x[0].numel() // x.shape[-1] if x.numel() else (x.shape[1:-1].numel())
        held_set = set(held)
        mask = tuple(g in held_set for g in self.groups)
        key = (mask, batch, rows, x.device)
        plan = self._plans.get(key)
        if plan is None:
            repeat = self.examples_per_name(batch, where)
            names = [g for g, h in zip(self.groups, mask) if h]
            local = {g: i for i, g in enumerate(names)}
            per_example = [local.get(self.groups[g], -1) if g >= 0 else -1 for g in self.example_group]
            index = torch.tensor(per_example, dtype=torch.int64).repeat_interleave(repeat * rows).to(x.device)
            plan = self._plans[key] = (names, index)
        return plan

    def plan_rows(self, held: Sequence[str], x: torch.Tensor, where: str) -> tuple[list[str], list[torch.Tensor]]:
        """As :meth:`plan`, but each adapter's rows instead of the per-row index: ``(names, rows)``
        with ``rows[i]`` the ascending ``(rows_i,)`` int64 indices of the rows routed to
        ``names[i]`` (for layers that run each adapter on its own rows). Cached with the plan."""
        names, index = self.plan(held, x, where)
        rows = self._rows.get(id(index))  # plans (and so their index tensors) live as long as self
        if rows is None:
            from peftcore.ops.lora_grouped_add import group_rows

            rows = self._rows[id(index)] = group_rows(index, len(names))
        return names, rows

    def examples(self, name: str, batch: int, device: torch.device) -> torch.Tensor:
        """Indices of the examples of a batch of ``batch`` routed to ``name`` (layers that loop)."""
        repeat = self.examples_per_name(batch, "a layer")
        chosen = [i for i, n in enumerate(self.names) if n == name]
        ids = torch.tensor(chosen, dtype=torch.int64)
        if repeat > 1:
            ids = (ids[:, None] * repeat + torch.arange(repeat)).reshape(-1)
        return ids.to(device)


def _routable_layers(model: nn.Module) -> Iterator[Any]:
    from peftcore.tuners.base import AdapterLayer

    for module in model.modules():
        if isinstance(module, AdapterLayer):
            yield module


def _check(model: nn.Module, names: Any) -> list[Any]:
    """Validates ``names`` for ``model``; returns the layers to route. Raises before anything runs."""
    from peftcore import lifecycle

    state = lifecycle.get_state(model)
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ConfigError(
            f"adapter_names must be a non-empty list with one adapter name per example, got {names!r}"
        )
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ConfigError(f"adapter_names must hold adapter names (str), got {bad[0]!r}")
    unknown = sorted({n for n in names if n != BASE and n not in state.adapters})
    if unknown:
        known = ", ".join(state.adapters) or "none"
        raise AdapterNotFoundError(
            f"adapter_names names {', '.join(map(repr, unknown))}, which this model does not hold; adapters: {known} "
            f"(and {BASE!r} for the base model)"
        )
    merged = [n for n, r in state.adapters.items() if r.merged]
    if merged:
        raise AdapterStateError(
            f"adapter {merged[0]!r} is merged into the base weights, so no example could run without it; "
            "call peftcore.unmerge(model) before routing per example"
        )
    layers = list(_routable_layers(model))
    routed = {n for n in names if n != BASE}
    for name in sorted(routed):
        method = state.adapters[name].method
        if not any(name in layer.adapter_names() and getattr(layer, "supports_routing", False) for layer in layers):
            raise ConfigError(
                f"adapter {name!r} uses {method!r}, which cannot route per example (adapter_names); "
                f"run it on the whole batch with peftcore.activate(model, {name!r}) instead (see docs/multi-adapter.md)"
            )
    for name in state.active:
        if name not in routed and not _method_routes(model, state, name, layers):
            raise ConfigError(
                f"adapter {name!r} ({state.adapters[name].method}) is active and cannot route, so it would apply to "
                "every example whatever adapter_names says; deactivate it (peftcore.activate(model, [...])) first"
            )
    if any(not layer.adapters_enabled for layer in layers):
        raise AdapterStateError("adapters are disabled (inside peftcore.disabled(model)); route outside that block")
    return [layer for layer in layers if getattr(layer, "supports_routing", False)]


def _method_routes(model: nn.Module, state: Any, name: str, layers: list[Any]) -> bool:
    holders = [layer for layer in layers if name in layer.adapter_names()]
    if not holders:  # no adapter layer holds it: a model-level method (prompt, prefix)
        return False
    return all(getattr(layer, "supports_routing", False) for layer in holders)


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str], *, expand: bool = False) -> Iterator[Routing]:
    """Runs every forward inside the block with one adapter per example.

    Example::

        with peftcore.route(model, ["a", "b", peftcore.routing.BASE, "a"]):
            logits = model(input_ids).logits   # example 0 and 3 through a, 1 through b, 2 base

    Args:
        model: a wrapped model.
        names: one adapter name per example of the batch, or :data:`BASE` for none.
        expand: accept batches of ``k * len(names)`` examples (name ``i`` for examples
            ``i*k .. i*k + k - 1``), as ``generate`` makes with beams.

    Yields:
        The :class:`Routing` (its ``used`` says whether a layer read it).

    Raises:
        AdapterNotFoundError: a name the model does not hold.
        AdapterStateError: a merged adapter, or adapters disabled.
        ConfigError: bad ``names``, a method that cannot route, a batch size that does not match
            (at the first layer), or names no layer read (on leaving the block, if a forward ran).
    """
    layers = _check(model, names)
    routing = Routing(names, expand=expand)
    busy = [layer for layer in layers if layer.routing is not None]
    if busy:
        raise ConfigError("this model is already routing per example (nested peftcore.route or adapter_names)")
    for layer in layers:
        layer.routing = routing
    try:
        yield routing
    finally:
        for layer in layers:
            layer.routing = None
    if not routing.used:
        raise ConfigError(
            f"adapter_names={list(names)!r} was not used: no adapter layer of this {type(model).__name__} ran inside "
            "the routing block, so no example got its adapter"
        )


# -- the adapter_names keyword ------------------------------------------------------------------
_OPEN = "_peftcore_routing_call"


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in args:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if KWARG not in kwargs:
        return None
    names = kwargs.pop(KWARG)
    if names is None:
        return args, kwargs
    context = route(model, names)
    routing = context.__enter__()
    batch = _batch_size(args, kwargs)
    if batch is not None:
        try:
            routing.examples_per_name(batch, f"{type(model).__name__}.forward")
        except ConfigError:
            _close(context)
            raise
    model.__dict__[_OPEN] = context
    return args, kwargs


def _close(context: Any) -> None:
    try:
        context.__exit__(ConfigError, ConfigError("closed"), None)
    except ConfigError:
        pass


def _post_hook(model: nn.Module, args: tuple, output: Any) -> None:
    context = model.__dict__.pop(_OPEN, None)
    if context is not None:
        context.__exit__(None, None, None)  # raises if no layer read the names


class RoutedGenerate:
    """``generate`` of one wrapped transformers model, taking ``adapter_names`` (one per prompt).

    Each name also stands for the beams and extra sequences ``generate`` makes of its prompt.
    Without ``adapter_names`` it is the class's ``generate``.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        original = type(model).generate.__get__(model)
        names = kwargs.pop(KWARG, None)
        if names is None:
            return original(*args, **kwargs)
        with route(model, names, expand=True):
            return original(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<generate of a peftcore-wrapped {type(self.model).__name__}: adapter_names routes per prompt>"


def install(model: nn.Module) -> None:
    """Makes ``model(..., adapter_names=...)`` (and ``model.generate(..., adapter_names=...)`` for
    transformers models) route per example. Called when a model gets its first adapter."""
    from peftcore.integrations.transformers import is_transformers_model

    if not any(h is _pre_hook for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        model.register_forward_hook(_post_hook, always_call=True)
    if is_transformers_model(model) and hasattr(type(model), _GENERATE) and _GENERATE not in model.__dict__:
        model.__dict__[_GENERATE] = RoutedGenerate(model)


def uninstall(model: nn.Module) -> None:
    """Removes what :func:`install` set (at ``unwrap``)."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if h in (_pre_hook, _post_hook)]:
            del hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)
    if isinstance(model.__dict__.get(_GENERATE), RoutedGenerate):
        del model.__dict__[_GENERATE]
