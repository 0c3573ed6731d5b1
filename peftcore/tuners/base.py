"""What every adapter method provides, and the layer that wraps an original module.

A method is any object with the attributes of :class:`Method` (a Protocol, not a base class):
built-ins and plugins are found through the same registry and used the same way.

Most methods keep their adapters in an :class:`AdapterLayer` that replaces a leaf module and
keeps the original inside it (``base_layer``), so that ``unwrap`` can put the very same object
back. :class:`LayerMethod` implements the whole :class:`Method` protocol for such methods,
given layer handlers; a method then only defines its config and its layers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, ClassVar, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from peftcore import targeting
from peftcore.errors import AdapterStateError, CheckpointError, UnsupportedModuleError


@runtime_checkable
class Method(Protocol):
    """An adapter method (LoRA, IA3, ...), as the registry and the lifecycle functions use it.

    Attributes:
        name: the name users pass to ``peftcore.wrap``.
        config_class: a dataclass; ``config_class(**options)`` validates and raises
            :class:`peftcore.ConfigError` (a ``ValueError``) on bad options.
        merges: whether :meth:`merge`/:meth:`unmerge` fold the adapter into base weights.
        identity_at_init: whether a freshly attached adapter leaves outputs unchanged.
    """

    name: str
    config_class: type
    merges: bool
    identity_at_init: bool

    def resolve_targets(self, model: nn.Module, config: Any, spec: targeting.TargetSpec) -> list[str]:
        """Module paths to attach to (may be empty for methods that attach to the model)."""

    def check_targets(self, model: nn.Module, config: Any, targets: list[str]) -> None:
        """Raises before anything changes if the method cannot attach to ``targets``."""

    def attach(self, model: nn.Module, name: str, config: Any, targets: list[str]) -> None:
        """Adds adapter ``name`` to the model. May leave partial changes on error (the caller rolls back)."""

    def detach(self, model: nn.Module, name: str) -> None:
        """Removes adapter ``name``, restoring original modules that hold no adapter any more.

        A merged adapter's delta stays in the base weights (callers unmerge first to undo it).
        """

    def adapter_parameters(self, model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
        """The parameters of adapter ``name``, with their model-level names."""

    def adapter_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The tensors to save, keyed ``<module path>.<tensor name>`` without the adapter name."""

    def load_adapter_state(self, model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
        """Copies saved tensors in; raises :class:`CheckpointError` naming mismatched keys/shapes."""

    def set_active(self, model: nn.Module, names: Sequence[str]) -> None:
        """Makes exactly ``names`` (adapters of this method) run in forward."""

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Turns every adapter of this method off (``False``) or back on."""

    def merge(self, model: nn.Module, name: str) -> None:
        """Folds adapter ``name`` into the base weights."""

    def unmerge(self, model: nn.Module, name: str) -> None:
        """Takes adapter ``name`` back out of the base weights."""


class AdapterLayer(nn.Module):
    """A module that stands in for an original module and holds named adapters of one method.

    The original module is kept as the child ``base_layer``. The state dict presents the
    original's tensors under the original keys (``query.weight``, not
    ``query.base_layer.weight``), so ``save_pretrained`` of a wrapped model writes a checkpoint
    the base class loads, and loading an original checkpoint into a wrapped model works.
    Attributes the layer lacks (``in_features``, ``weight``, ...) are read from the original.

    Subclasses set ``method`` and implement :meth:`add_adapter`, :meth:`remove_adapter`,
    :meth:`adapter_tensors` and ``forward``; merging methods also implement
    :meth:`merge`/:meth:`unmerge`.
    """

    method: ClassVar[str] = ""
    #: Whether forward honours :attr:`routing` (per-example adapters, :mod:`peftcore.routing`).
    #: A layer class that does reads ``self.routing`` (``None`` outside a routed call) and gives
    #: each example its adapter; layers that do not are refused by ``peftcore.route``.
    supports_routing: ClassVar[bool] = False
    #: The :class:`peftcore.routing.Routing` of the call in progress, set by ``peftcore.route``.
    routing: Any = None

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.adapters_enabled = True

    # -- adapters ---------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def add_adapter(self, name: str, config: Any) -> None:
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors (parameters and buffers) of adapter ``name``, keyed by their saved name."""
        raise NotImplementedError

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = tuple(n for n in names if n in self.adapter_names())

    def running_adapters(self) -> tuple[str, ...]:
        """Adapters whose computation runs in forward: active, enabled and not merged."""
        if not self.adapters_enabled:
            return ()
        return tuple(n for n in self.active_adapters if n not in self.merged_adapters)

    def merge(self, name: str) -> None:
        raise AdapterStateError(f"{type(self).__name__} adapters cannot be merged")

    def unmerge(self, name: str) -> None:
        raise AdapterStateError(f"{type(self).__name__} adapters cannot be unmerged")

    def after_load(self, name: str) -> None:
        """Called after saved tensors were copied into adapter ``name`` (default: nothing to do)."""

    # -- attribute and state-dict transparency -----------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    def _base_state_keys(self) -> set[str]:
        base = self._modules["base_layer"]
        keys = {n for n, _ in base.named_parameters(remove_duplicate=False)}
        for mod_name, mod in base.named_modules(remove_duplicate=False):
            for buf_name, buf in mod._buffers.items():
                if buf is not None and buf_name not in mod._non_persistent_buffers_set:
                    keys.add(f"{mod_name}.{buf_name}" if mod_name else buf_name)
        return keys

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        destination = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        base_prefix = prefix + "base_layer."
        ours = [k for k in destination if k.startswith(prefix)]
        moved = [(k[: len(prefix)] + k[len(base_prefix):] if k.startswith(base_prefix) else k, destination.pop(k)) for k in ours]
        for key, value in moved:
            destination[key] = value
        return destination

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for key in self._base_state_keys():
            if prefix + key in state_dict and prefix + "base_layer." + key not in state_dict:
                state_dict[prefix + "base_layer." + key] = state_dict.pop(prefix + key)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={list(self.active_adapters)}, merged={self.merged_adapters}"


@runtime_checkable
class LayerHandler(Protocol):
    """How a method attaches to one kind of module (entry-point group ``peftcore.layers``).

    Attributes:
        method: the method this handler serves, e.g. ``"lora"``.
        linear_like: whether the modules it handles count as linear layers (default targets,
            ``"all-linear"``).
        priority: handlers with a higher priority are asked first (plugins for a subclass of
            ``nn.Linear`` set it above 0 to win over the built-in ``nn.Linear`` handler).
    """

    method: str
    linear_like: bool
    priority: int

    def matches(self, module: nn.Module) -> bool:
        """Whether this handler can wrap ``module``."""

    def wrap(self, module: nn.Module) -> AdapterLayer:
        """A new adapter layer (with no adapters yet) that keeps ``module`` as its base_layer."""


def iter_layers(model: nn.Module, method: str) -> Iterator[tuple[str, AdapterLayer]]:
    """The adapter layers of one method, with their paths."""
    for path, module in targeting.iter_modules(model):
        if isinstance(module, AdapterLayer) and module.method == method:
            yield path, module


def _takes_config(default_targets: Any) -> bool:
    """Whether a (bound) ``default_targets`` accepts the config (overrides from before it was passed do not)."""
    try:
        inspect.signature(default_targets).bind("path", None, config=None)
    except TypeError:
        return False
    except ValueError:  # no signature to read: call it the old way
        return False
    return True


def _describe_type(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass
class LayerMethod:
    """The :class:`Method` protocol for methods whose adapters live in adapter layers.

    A method built on it gives its name, config class and the name of the handler family in
    ``peftcore.layers`` (entries ``<method>.<handler>``); handlers wrap modules into layers.
    """

    name: str
    config_class: type
    merges: bool = False
    identity_at_init: bool = True

    # -- handlers -------------------------------------------------------------------------------
    def handlers(self) -> list[LayerHandler]:
        from peftcore import registry

        return registry.layer_handlers(self.name)

    def handler_for(self, module: nn.Module) -> LayerHandler | None:
        for handler in self.handlers():
            if handler.matches(module):
                return handler
        return None

    def is_linear_like(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):
            module = module.base_layer
        handler = self.handler_for(module)
        return handler is not None and handler.linear_like

    def default_targets(self, path: str, module: nn.Module, config: Any = None) -> bool:
        """Whether ``targets=None`` selects the module at ``path`` (default: every linear-like
        module; the output head is left out before this is asked).

        Args:
            path: the module's dotted path, e.g. ``"encoder.layer.0.attention.self.query"``.
            module: the module there (for a module that already holds an adapter of this
                method, its adapter layer).
            config: the adapter's options (an instance of ``config_class``), so that an option
                can change the default targets. An override written with two arguments,
                ``default_targets(self, path, module)``, keeps working: the config is passed
                only to overrides that take a third argument.
        """
        return self.is_linear_like(module)

    # -- Method protocol -------------------------------------------------------------------------
    def resolve_targets(self, model: nn.Module, config: Any, spec: targeting.TargetSpec) -> list[str]:
        """Module paths to attach to.

        Args:
            model: the model being wrapped.
            config: the adapter's options (an instance of ``config_class``).
            spec: what the user passed to ``wrap``: ``spec.targets`` (``None`` for the method's
                defaults, see :meth:`default_targets`; else names, a regex, ``"all-linear"`` or a
                callable ``(path, module) -> bool``), ``spec.exclude`` (the same forms) and
                ``spec.layers`` (block indices).

        Returns:
            Dotted module paths, in model order.
        """
        if spec.targets is None:
            heads = targeting.output_head_paths(model)
            default = self.default_targets
            if _takes_config(default):
                default = functools.partial(default, config=config)

            def all_linear_except_head(path: str, module: nn.Module) -> bool:
                return path not in heads and default(path, module)

            spec = dataclasses.replace(spec, targets=all_linear_except_head)
        paths = targeting.select(model, spec, default=None, is_linear_like=self.is_linear_like)  # type: ignore[arg-type]
        explicit_names = isinstance(spec.targets, (list, tuple, set, frozenset))
        kept = []
        for path in paths:
            module = targeting.get_module(model, path)
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            if isinstance(module, AdapterLayer) or self.handler_for(base) is not None:
                kept.append(path)
            elif module._modules and not explicit_names:
                continue  # a container matched by a regex or callable: its leaves decide
            else:
                kept.append(path)  # check_targets explains why it cannot be wrapped
        return kept

    def check_targets(self, model: nn.Module, config: Any, targets: list[str]) -> None:
        if not targets:
            raise UnsupportedModuleError(f"{self.name}: nothing to attach to")
        for path in targets:
            module = targeting.get_module(model, path)
            if isinstance(module, AdapterLayer):
                if module.method != self.name:
                    raise UnsupportedModuleError(
                        f"module {path!r} already holds a {module.method!r} adapter; peftcore does not "
                        f"stack a {self.name!r} adapter on the same module. Exclude it "
                        f"(exclude=[{path!r}]) or remove the {module.method!r} adapter first"
                    )
                continue
            if self.handler_for(module) is None:
                raise UnsupportedModuleError(self._no_handler_message(path, module))

    def _no_handler_message(self, path: str, module: nn.Module) -> str:
        known = ", ".join(sorted({type(h).__name__ if not hasattr(h, "describe") else h.describe() for h in self.handlers()}))
        return (
            f"{self.name} cannot attach to {path!r}: no layer handler for its type "
            f"{_describe_type(module)} (handlers: {known}). Add one with "
            f"peftcore.register_layer('{self.name}.<handler>', handler) or ship it in a plugin under the "
            f"'peftcore.layers' entry-point group (see docs/plugins.md), or leave the module out of targets"
        )

    def layer_config(self, config: Any, path: str) -> Any:
        """The options the layer at ``path`` gets (default: the adapter's; LoRA's per-module patterns)."""
        return config

    def attach(self, model: nn.Module, name: str, config: Any, targets: list[str]) -> None:
        for path in targets:
            module = targeting.get_module(model, path)
            if not isinstance(module, AdapterLayer):
                handler = self.handler_for(module)
                if handler is None:
                    raise UnsupportedModuleError(self._no_handler_message(path, module))
                module = handler.wrap(module)
                targeting.set_module(model, path, module)
            module.add_adapter(name, self.layer_config(config, path))
            module.set_active((*module.active_adapters, name))

    def detach(self, model: nn.Module, name: str) -> None:
        for path, layer in list(iter_layers(model, self.name)):
            if name not in layer.adapter_names():
                continue
            layer.remove_adapter(name)  # a merged adapter's delta stays in the base weights
            layer.active_adapters = tuple(n for n in layer.active_adapters if n != name)
            if not layer.adapter_names():
                targeting.set_module(model, path, layer.base_layer)

    def _layers_with(self, model: nn.Module, name: str) -> list[tuple[str, AdapterLayer]]:
        return [(p, layer) for p, layer in iter_layers(model, self.name) if name in layer.adapter_names()]

    def adapter_parameters(self, model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
        params = []
        for path, layer in self._layers_with(model, name):
            for key, tensor in layer.adapter_tensors(name).items():
                if isinstance(tensor, nn.Parameter):
                    params.append((f"{path}.{key}", tensor))
        return params

    def adapter_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        return {
            f"{path}.{key}": tensor.detach()
            for path, layer in self._layers_with(model, name)
            for key, tensor in layer.adapter_tensors(name).items()
        }

    def load_adapter_state(self, model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
        own = {}
        for path, layer in self._layers_with(model, name):
            for key, tensor in layer.adapter_tensors(name).items():
                own[f"{path}.{key}"] = tensor
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [
            f"{k}: saved shape {tuple(state[k].shape)}, model expects {tuple(t.shape)}"
            for k, t in own.items()
            if k in state and state[k].shape != t.shape
        ]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CheckpointError(f"the saved {self.name!r} adapter does not fit the model: {'; '.join(problems[:5])}{more}")
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key].to(dtype=tensor.dtype, device=tensor.device))
        for _, layer in self._layers_with(model, name):
            layer.after_load(name)

    def set_active(self, model: nn.Module, names: Sequence[str]) -> None:
        for _, layer in iter_layers(model, self.name):
            layer.set_active(names)

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        for _, layer in iter_layers(model, self.name):
            layer.adapters_enabled = enabled

    def merge(self, model: nn.Module, name: str) -> None:
        for _, layer in self._layers_with(model, name):
            if name not in layer.merged_adapters:
                layer.merge(name)

    def unmerge(self, model: nn.Module, name: str) -> None:
        for _, layer in self._layers_with(model, name):
            if name in layer.merged_adapters:
                layer.unmerge(name)
