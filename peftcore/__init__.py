"""peftcore: parameter-efficient fine-tuning for PyTorch, with fused kernels and plugins.

Quick start::

    import peftcore
    model = peftcore.wrap(model, "lora", rank=8, trainable=["classifier"])
    ...  # train as usual
    peftcore.save(model, "my-adapter")
    peftcore.load(fresh_model, "my-adapter")
"""

from peftcore._version import __version__
from peftcore.errors import (
    AdapterNotFoundError,
    AdapterStateError,
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    DataError,
    PeftcoreError,
    PluginConflictError,
    PluginError,
    TargetError,
    UnsupportedModuleError,
)
from peftcore.hotswap import hotswap
from peftcore.lifecycle import activate, adapters, delete, disabled, merge, unmerge, unwrap, wrap
from peftcore.ops.dispatch import backends
from peftcore.persistence import load, save
from peftcore.registry import methods, register_kernel, register_layer, register_method
from peftcore.routing import route
from peftcore.summary import summary

__all__ = [
    "__version__",
    "wrap",
    "unwrap",
    "merge",
    "unmerge",
    "disabled",
    "adapters",
    "activate",
    "delete",
    "route",
    "hotswap",
    "save",
    "load",
    "summary",
    "methods",
    "backends",
    "register_method",
    "register_layer",
    "register_kernel",
    "PeftcoreError",
    "ConfigError",
    "TargetError",
    "UnsupportedModuleError",
    "AdapterNotFoundError",
    "AdapterStateError",
    "CheckpointError",
    "PluginError",
    "PluginConflictError",
    "BackendUnavailableError",
    "DataError",
]
