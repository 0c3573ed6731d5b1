"""The ``cuda`` backend of ``lora_grouped``: the C++ op's CUDA kernels (``csrc/cuda/lora_grouped.cu``).

The same op, schema and Python autograd as the ``cpp`` backend (:mod:`peftcore.ops.lora_grouped_cpp`);
cuBLAS through ATen for the base GEMMs, the kernels of ``csrc/cuda/lora_grouped_device.cuh`` for the
grouped low-rank parts (emulated on the CPU in ``tests/ops/test_lora_grouped_cuda.py``). They exist
only in an extension built with CUDA (torch with CUDA and a toolkit at build time).
"""

from __future__ import annotations

import torch

from peftcore.ops import _extension
from peftcore.ops.lora_grouped import OP
from peftcore.ops.lora_grouped_cpp import cpp_lora_grouped

_OPS = ("lora_grouped", "lora_grouped_backward")


class _CudaKernel:
    """The ``cuda`` backend of ``lora_grouped`` (entry point ``lora_grouped.cuda``)."""

    op = OP
    backend = "cuda"
    devices = ("cuda",)
    # Below triton (20) until a GPU measures it: these kernels are a first, untuned version
    # (one thread per output element), written where no GPU was available.
    priority = 15
    seed_tensor = True
    peftcore_api = 1
    hint = (
        "Build peftcore's extension with CUDA: a CUDA build of torch and the CUDA toolkit (nvcc, "
        "CUDA_HOME) at build time, then 'pip install --no-build-isolation -e .'; see docs/gpu-kernels.md"
    )

    def available(self) -> tuple[bool, str]:
        ok, reason = _extension.load()
        if not ok:
            return False, reason
        if not _extension.torch_has_op(OP):
            return False, "the loaded peftcore._C has no lora_grouped op (an old build; rebuild it)"
        missing = [op for op in _OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"peftcore::{op}", "CUDA")]
        if missing:
            return False, f"peftcore._C has no CUDA kernels for {', '.join(missing)} (built without CUDA)"
        if not torch.cuda.is_available():
            return False, "no CUDA device: torch sees none"
        return True, ""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return cpp_lora_grouped(*args, **kwargs)  # the op routes CUDA tensors to the CUDA kernels


CUDA = _CudaKernel()
