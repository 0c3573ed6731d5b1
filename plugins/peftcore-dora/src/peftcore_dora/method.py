"""The DoRA method: LoRA's targets, DoRA's layers."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from peftcore.errors import AdapterStateError
from peftcore.tuners.base import LayerMethod, iter_layers

from peftcore_dora.config import DoraConfig
from peftcore_dora.layers import DoraLayer


class DoraMethod(LayerMethod):
    """DoRA (Liu et al. 2024): a trained magnitude times the LoRA-updated, normalised direction.

    Default targets: every linear-like layer (``nn.Linear``, transformers ``Conv1D``) except the
    output head, as for LoRA.
    """

    peftcore_api = 1

    def __init__(self) -> None:
        super().__init__(name="dora", config_class=DoraConfig, merges=True, identity_at_init=True)

    def set_active(self, model: nn.Module, names: Sequence[str]) -> None:
        # Check every layer before changing any: at most one unmerged DoRA adapter runs per layer.
        for path, layer in iter_layers(model, self.name):
            running = [n for n in names if n in layer.adapter_names() and n not in layer.merged_adapters]
            if len(running) > 1:
                raise AdapterStateError(
                    f"DoRA adapters {running} cannot run together on {path!r} (each renormalises the whole "
                    "weight); activate one, or merge all but one first"
                )
        super().set_active(model, names)

    def unmerge(self, model: nn.Module, name: str) -> None:
        # Check every layer before changing any, so a refusal leaves the model fully merged.
        for _, layer in iter_layers(model, self.name):
            if isinstance(layer, DoraLayer) and name in layer.merged_adapters:
                problem = layer.unmerge_problem(name)
                if problem:
                    raise AdapterStateError(
                        f"cannot unmerge DoRA adapter {name!r}: {problem}. Unwrap with "
                        "peftcore.unwrap(model, merge=True) to keep the merged weights instead"
                    )
        super().unmerge(model, name)
