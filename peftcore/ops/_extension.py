"""Loading the compiled extension ``peftcore._C`` (C++ ops, CUDA when built with it)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load() -> tuple[bool, str]:
    """Imports ``peftcore._C`` once, registering its ops; returns (loaded, reason if not).

    Importing the module registers the C++ schemas and kernels (``torch.ops.peftcore.*``); the
    Python halves of each op the build declares (fake kernels, autograd) are registered right
    after, so the ops are complete on every device whoever loads the extension first.
    """
    try:
        import peftcore._C  # noqa: F401  (import registers torch.ops.peftcore.*)
    except ImportError as exc:
        return False, (
            f"the C++ extension peftcore._C is not built ({exc}); build it with "
            "'pip install --no-build-isolation -e .' (torch must be installed first)"
        )
    if torch_has_op("lora_linear"):
        from peftcore.ops import lora_cpp

        lora_cpp.register()
    if torch_has_op("bottleneck"):
        from peftcore.ops import bottleneck_cpp

        bottleneck_cpp.register()
    if torch_has_op("lora_grouped"):
        from peftcore.ops import lora_grouped_cpp

        lora_grouped_cpp.register()
    return True, ""


def torch_has_op(name: str) -> bool:
    """Whether ``torch.ops.peftcore.<name>`` exists (the loaded build declares it)."""
    import torch

    try:
        getattr(torch.ops.peftcore, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def has_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    import torch

    ok, _ = load()
    return ok and torch._C._dispatch_has_kernel_for_dispatch_key("peftcore::lora_linear", "CUDA")
