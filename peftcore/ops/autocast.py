"""``torch.autocast`` for peftcore's ops, the way ``nn.Linear`` follows it.

Inside an autocast region on a device type, ``F.linear`` casts its floating-point inputs (the
float32 weight and bias included) to the region's dtype, bf16 or fp16, and computes there; the
casts are autograd nodes, so float32 parameters get float32 gradients. ``lora_linear`` and
``bottleneck`` do the same, in two places:

* :func:`cast` at the entry of the dispatching functions (:func:`peftcore.ops.lora.lora_linear`,
  :func:`peftcore.ops.bottleneck.bottleneck`), once for every backend (reference, cpp, triton,
  cuda and plugins' kernels), so kernels only ever see one dtype;
* :func:`register` for the C++ ops (``torch.ops.peftcore.*``): a kernel at the ``Autocast<Device>``
  dispatch key that casts and runs the op with that key excluded, as
  ``torch.library.register_autocast`` does, so the ops follow autocast for any caller and
  ``torch.compile`` traces the rule. ``register_autocast`` itself takes one fixed dtype; this one
  reads the region's dtype at each call, so bf16 and fp16 regions both work.

As autocast does, float64 tensors and tensors on other device types are left alone.
"""

from __future__ import annotations

from typing import Any

import torch

#: Device types whose autocast the C++ ops follow (the devices they have kernels for).
DEVICE_TYPES = ("cpu", "cuda")


def _cast_one(t: Any, device_type: str, dtype: torch.dtype) -> Any:
    if (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dtype != dtype
        and t.dtype != torch.float64
        and t.device.type == device_type
    ):
        return t.to(dtype)
    return t


def cast(device_type: str, *tensors: Any) -> tuple:
    """``tensors`` cast to the autocast dtype of ``device_type`` (call where autocast is enabled).

    ``None`` and non-tensors pass through, as do integer, float64 and other-device tensors.
    """
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_cast_one(t, device_type, dtype) for t in tensors)


def register(qualname: str, device_types: tuple[str, ...] = DEVICE_TYPES) -> None:
    """Registers the autocast kernel of the op ``qualname`` (e.g. ``"peftcore::lora_linear"``).

    For each device type: under autocast, floating-point tensor arguments are cast to the region's
    dtype and the op runs below the autocast key (its casts are recorded by autograd, which sits
    below autocast). Register once per op (re-registering a key raises).
    """
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in device_types:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, _device_type=device_type, _below=below):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(_below):
                return op(*(_cast_one(a, _device_type, dtype) for a in args))

        torch.library.impl(qualname, key, kernel)
