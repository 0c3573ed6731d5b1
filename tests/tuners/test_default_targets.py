"""LayerMethod.default_targets gets the adapter's config; two-argument overrides keep working."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

import peftcore
from peftcore import registry
from peftcore.tuners.base import LayerMethod
from peftcore.tuners.lora.config import LoraConfig
from peftcore.tuners.lora.layers import LINEAR, LoraLinear


@dataclasses.dataclass
class _Config(LoraConfig):
    only: str = "fc1"  # the option that changes the default targets


class _WithConfig(LayerMethod):
    def default_targets(self, path, module, config=None):
        return path == config.only


class _TwoArguments(LayerMethod):  # written before the config was passed
    def default_targets(self, path, module):
        return path == "fc2"


def _model():
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)).requires_grad_(False)


@pytest.mark.parametrize("cls, options, expected", [
    (_WithConfig, {"only": "1"}, ["1"]),
    (_WithConfig, {"only": "0"}, ["0"]),
    (_TwoArguments, {}, []),
])
def test_default_targets_sees_the_config_and_old_overrides_work(cls, options, expected):
    name = f"dt_{cls.__name__.lower()}"
    layer = type(f"{name}_layer", (LoraLinear,), {"method": name})
    method = cls(name=name, config_class=_Config, merges=True)
    with registry.LAYERS.temporarily(f"{name}.linear", dataclasses.replace(LINEAR, method=name, layer=layer)), \
            registry.METHODS.temporarily(name, method):
        model = _model()
        if not expected:  # the two-argument override asks for a path the model lacks
            with pytest.raises(peftcore.PeftcoreError):
                peftcore.wrap(model, name, **options)
            model = nn.Sequential()
            model.add_module("fc2", nn.Linear(4, 4))
            model.add_module("head", nn.Linear(4, 2))
            expected = ["fc2"]
        peftcore.wrap(model, name, **options)
        assert list(model._peftcore.adapters["default"].targets) == expected
