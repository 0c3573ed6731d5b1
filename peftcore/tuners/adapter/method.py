"""The bottleneck adapter method: ``wrap(model, "adapter", size=64, placement="houlsby", ...)``.

Targets are the modules whose output receives an adapter. By default they come from the model's
blocks (:mod:`peftcore.tuners.adapter.families`): the attention and feed-forward output
projections for Houlsby, the feed-forward output projection for Pfeiffer and parallel. Given
explicitly (``targets=``, ``exclude=``, ``layers=``), any module works whose output width can be
read (a linear layer, or a module with linear layers inside); a parallel adapter reads the
target's own input, except at a known block's FFN output projection, where it reads the FFN
block's input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from peftcore import targeting
from peftcore.errors import TargetError, UnsupportedModuleError
from peftcore.tuners.adapter import families
from peftcore.tuners.adapter.config import AdapterConfig
from peftcore.tuners.adapter.layers import BottleneckLayer
from peftcore.tuners.base import AdapterLayer, LayerMethod


def _is_linear_like(module: nn.Module) -> bool:
    return families._linear_widths(families._unwrapped(module)) is not None


def _enclosing_adapter_layer(model: nn.Module, path: str) -> str | None:
    """The path of an adapter layer that ``path`` lies inside (below its ``base_layer``), if any."""
    parts = path.split(".")
    module = model
    for i, part in enumerate(parts[:-1]):
        module = getattr(module, part, None)
        if module is None:
            return None
        if isinstance(module, AdapterLayer):
            return ".".join(parts[: i + 1])
    return None


class AdapterMethod(LayerMethod):
    """Bottleneck adapters (Houlsby et al. 2019), placed Houlsby, Pfeiffer or parallel (He et al. 2022).

    The adapters cannot be merged into base weights (an activation sits between the projections).
    """

    peftcore_api = 1

    def __init__(self) -> None:
        super().__init__(name="adapter", config_class=AdapterConfig, merges=False, identity_at_init=True)

    def is_linear_like(self, module: nn.Module) -> bool:
        return _is_linear_like(module)

    def resolve_targets(self, model: nn.Module, config: Any, spec: targeting.TargetSpec) -> list[str]:
        if spec.targets is None:
            points = families.insertion_points(model, config.placement)
            if not points:
                layouts = "; ".join(
                    f"{l.family}: {l.attn_out}, {l.ffn_out}, {l.ffn_in}" for l in families.LAYOUTS
                )
                raise TargetError(
                    f"adapter: found no transformer block of a known layout in {type(model).__name__} "
                    f"(a block holds, per family, {layouts}). Pass targets=[...] naming the modules whose "
                    "output receives an adapter, e.g. the attention and feed-forward output projections "
                    "(see docs/methods/adapter.md)"
                )
            spec = dataclasses.replace(spec, targets=points)
        return targeting.select(model, spec, default=None, is_linear_like=_is_linear_like)  # type: ignore[arg-type]

    def check_targets(self, model: nn.Module, config: Any, targets: list[str]) -> None:
        if not targets:
            raise UnsupportedModuleError("adapter: nothing to attach to")
        blocks = families.find_blocks(model) if config.parallel else []
        for path in targets:
            self._check_target(model, config, path, blocks)
        ordered = sorted(targets)
        for outer, inner in zip(ordered, ordered[1:]):
            if inner.startswith(outer + "."):
                raise TargetError(
                    f"adapter targets {outer!r} and {inner!r} nest (one contains the other); an adapter goes "
                    f"on one of them. Narrow targets= or add exclude=[{inner!r}]"
                )

    def _check_target(self, model: nn.Module, config: Any, path: str, blocks: list[families.Block]) -> None:
        holder = _enclosing_adapter_layer(model, path)
        if holder is not None:
            raise UnsupportedModuleError(
                f"adapter cannot attach to {path!r}: it lies inside {holder!r}, which already holds a "
                f"{targeting.get_module(model, holder).method!r} adapter"
            )
        module = targeting.get_module(model, path)
        if isinstance(module, AdapterLayer) and module.method != self.name:
            raise UnsupportedModuleError(
                f"module {path!r} already holds a {module.method!r} adapter; peftcore does not stack an "
                f"'adapter' on the same module. Exclude it (exclude=[{path!r}]) or remove the "
                f"{module.method!r} adapter first"
            )
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        inner = [p for p, m in targeting.iter_modules(base) if isinstance(m, AdapterLayer)]
        if inner:
            raise UnsupportedModuleError(
                f"adapter cannot attach to {path!r}: it contains {path}.{inner[0]}, which holds an adapter "
                "of its own; target a module without adapters inside"
            )
        if families.output_width(base) is None:
            raise UnsupportedModuleError(
                f"adapter cannot attach to {path!r} ({type(base).__name__}): the width of its output is "
                "unknown (it is no nn.Linear or transformers Conv1D and holds none); target a linear "
                "layer, or a module whose last linear layer produces its output"
            )
        if config.parallel:
            source = families.parallel_input(path, blocks)
            if families.input_width(targeting.get_module(model, source)) is None:
                raise UnsupportedModuleError(
                    f"a parallel adapter at {path!r} reads the input of {source!r}, whose width is unknown "
                    "(it holds no linear layer); target another module"
                )
            if isinstance(module, BottleneckLayer) and module.input_path not in (None, source):
                raise UnsupportedModuleError(
                    f"parallel adapters at {path!r} already read the input of {module.input_path!r}, not {source!r}"
                )

    def attach(self, model: nn.Module, name: str, config: Any, targets: list[str]) -> None:
        blocks = families.find_blocks(model) if config.parallel else []
        for path in targets:
            layer = targeting.get_module(model, path)
            if not isinstance(layer, BottleneckLayer):
                layer = BottleneckLayer(layer, path)
                targeting.set_module(model, path, layer)
            out_features = families.output_width(layer)
            in_features = out_features
            if config.parallel:
                source = families.parallel_input(path, blocks)
                source_module = layer if source == path else targeting.get_module(model, source)
                layer.connect_input(source, source_module)
                in_features = families.input_width(source_module)
            layer.add_adapter(name, config, in_features, out_features)
            layer.set_active((*layer.active_adapters, name))
