"""The LoRA method: low-rank updates ``W + scale * B @ A`` on linear-like, embedding and conv layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftcore.errors import ConfigError
from peftcore.tuners.base import AdapterLayer, LayerMethod
from peftcore.tuners.lora.config import LoraConfig
from peftcore import targeting


class LoraMethod(LayerMethod):
    """LoRA (Hu et al. 2021), with rsLoRA scaling and PiSSA initialisation.

    Default targets: every linear-like layer (``nn.Linear``, transformers ``Conv1D`` and plugin
    handlers that declare ``linear_like``) except the output head.
    """

    peftcore_api = 1

    def __init__(self) -> None:
        super().__init__(name="lora", config_class=LoraConfig, merges=True, identity_at_init=True)

    def layer_config(self, config: Any, path: str) -> Any:
        return config.for_module(path)

    def check_targets(self, model: nn.Module, config: Any, targets: list[str]) -> None:
        super().check_targets(model, config, targets)
        if config.init == "pissa":
            for path in targets:
                module = targeting.get_module(model, path)
                base = module.base_layer if isinstance(module, AdapterLayer) else module
                if not self.is_linear_like(base):
                    raise ConfigError(
                        f"init='pissa' works on linear layers only, but {path!r} is a "
                        f"{type(base).__name__}; exclude it or use init='default'"
                    )
