"""The ``cuda`` backend of ``lora_linear``: the C++ op's CUDA kernels (``csrc/cuda/``).

``csrc/cuda/lora_linear.cu`` registers CUDA implementations of ``peftcore::lora_linear`` and
``peftcore::lora_linear_backward`` (the same ops, schema and Python autograd as the ``cpp``
backend, :mod:`peftcore.ops.lora_cpp`): cuBLAS through ATen for the base and undropped matmuls,
hand-written kernels with in-kernel Philox for the dropout parts (``lora_linear_device.cuh``).
They exist only in an extension built with CUDA: torch with CUDA plus a toolkit at build time
(``setup.py`` checks ``torch.version.cuda`` and ``CUDA_HOME``). See ``docs/gpu-kernels.md``.
"""

from __future__ import annotations

import torch

from peftcore.ops import _extension
from peftcore.ops.lora import OP
from peftcore.ops.lora_cpp import cpp_lora_linear

#: Ops of the schema that need a CUDA kernel for this backend to run.
_OPS = ("lora_linear", "lora_linear_backward")


def _missing_cuda_kernels() -> list[str]:
    return [op for op in _OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"peftcore::{op}", "CUDA")]


class _CudaKernel:
    """The ``cuda`` backend of ``lora_linear`` (entry point ``lora_linear.cuda``)."""

    op = OP
    backend = "cuda"
    devices = ("cuda",)
    # Above triton (20): cuBLAS carries the base matmul here. Not measured yet (no GPU where this
    # was written); revisit with bench/ numbers from a GPU.
    priority = 30
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
        missing = _missing_cuda_kernels()
        if missing:
            if torch.version.cuda is None:
                why = f"torch {torch.__version__} is a CPU-only build, so setup.py compiled no CUDA sources"
            else:
                why = "it was built without a CUDA toolkit (CUDA_HOME/nvcc not found at build time) or with PEFTCORE_NO_CUDA=1"
            return False, f"peftcore._C has no CUDA kernels for {', '.join(missing)}: {why}"
        if not torch.cuda.is_available():
            return False, "no CUDA device: torch sees none"
        return True, ""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        # The op is device-generic: the same launcher as the cpp backend, and the dispatcher
        # routes CUDA tensors to csrc/cuda/lora_linear.cu. The seed stays a CPU tensor (the
        # kernels read it without a device sync).
        return cpp_lora_linear(*args, **kwargs)


CUDA = _CudaKernel()
