"""The CUDA kernels of ``lora_linear`` (``csrc/cuda/``), checked as far as each machine allows.

* Everywhere with nvcc: the sources compile (the torch-free kernels by default; the torch-facing
  ``lora_linear.cu`` as a slow test, since torch's headers take a minute or two).
* Everywhere with g++: the kernels themselves run on the CPU, one thread per CUDA thread
  (``tests/ops/cuda_emulation.cpp``), against the reference, mask bit for bit.
* Without the extension's CUDA kernels: the backend reports itself unavailable, and why.
* On a GPU (``gpu``): the ``cuda`` and ``triton`` backends against the reference on CUDA tensors.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import peftcore
from peftcore.errors import BackendUnavailableError
from peftcore.ops import dispatch, lora, philox
from peftcore.ops.lora_cuda import CUDA

REPO = Path(__file__).resolve().parents[2]
CUDA_DIR = REPO / "csrc" / "cuda"


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")


def _compile(args: list[str], what: str, timeout: int) -> None:
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{what} failed ({' '.join(args)}):\n{run.stderr[-4000:]}"


# -- compilation -------------------------------------------------------------------------------


@needs_nvcc
def test_cuda_kernel_sources_compile_with_nvcc(tmp_path):
    # The kernels and launchers need only the CUDA toolkit; two architectures, cubin for each.
    for source in sorted(CUDA_DIR.glob("*.cu")):
        if source.name in ("lora_linear.cu", "lora_grouped.cu"):
            continue  # torch-facing: compiled against torch's headers in the bindings tests (here and test_lora_grouped_cuda.py)
        _compile(
            [NVCC, "-std=c++17", "-O3", "--compile", str(source), "-o", str(tmp_path / f"{source.stem}.o"),
             "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"],
            f"nvcc {source.name}", timeout=600,
        )
        assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


@pytest.mark.slow
@needs_nvcc
def test_torch_bindings_compile_with_nvcc(tmp_path):
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    torch_include = Path(cpp_extension.include_paths()[0])
    # A CPU build of torch ships c10/cuda's headers but not the one header its CMake generates
    # for CUDA builds; its whole content is this macro.
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, f"-I{tmp_path / 'shim'}")
    _compile(
        [NVCC, "-std=c++20", "-O1", "-Xcompiler", "-fPIC", "--compile", str(CUDA_DIR / "lora_linear.cu"),
         "-o", str(tmp_path / "lora_linear.o"), "-arch=sm_80", "-DPEFTCORE_WITH_CUDA", *includes],
        "nvcc lora_linear.cu", timeout=900,
    )


# -- the kernels, emulated on the CPU --------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _emulation(build_dir: str) -> ctypes.CDLL:
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    lib = Path(build_dir) / "cuda_emulation.so"
    _compile(
        [gxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
         str(Path(__file__).with_name("cuda_emulation.cpp")), "-o", str(lib)],
        "g++ cuda_emulation.cpp", timeout=300,
    )
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _emulation(str(tmp_path_factory.mktemp("cuda-emulation")))


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _drop_args(p: float, seed: int) -> list:
    return [ctypes.c_int(int(p > 0)), ctypes.c_uint64(seed & (2**64 - 1)), ctypes.c_uint32(philox.threshold(p)),
            ctypes.c_double(1.0 / (1.0 - p))]


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _i64(*values: int) -> list:
    return [ctypes.c_int64(v) for v in values]


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    if p == 0.0:
        return x.double()
    return x.double() * philox.keep_mask(seed, x.shape, p) / (1.0 - p)


TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SEED = 2**64 - 987654321  # high bit set: the key's upper word matters
# (M, K, r): several row tiles with a partial one; K a multiple of 8 (one Philox block per
# quad) and not (quads straddle blocks); ranks within one 32-wide tile and across two.
EMU_SHAPES = [(111, 29, 5), (64, 32, 1), (45, 70, 40)]


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype] * max(1.0, ref.abs().max().item())
    err = (got.double() - ref).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("M, K, r", EMU_SHAPES)
def test_emulated_dropout_project(emu, M, K, r, p, dtype):
    x = torch.randn(K, M, dtype=dtype).t()  # non-contiguous: the kernel reads strides
    A = torch.randn(r, K, dtype=dtype)
    h = torch.full((M, r), float("nan"), dtype=dtype)
    getattr(emu, f"emu_dropout_project_{_SUFFIX[dtype]}")(
        _ptr(x), *_i64(*x.stride()), _ptr(A), *_i64(*A.stride()), _ptr(h), *_i64(M, K, r), *_drop_args(p, SEED))
    _close(h, _dropped(x, p, SEED) @ A.double().T, dtype, "h")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("M, K, r", EMU_SHAPES)
def test_emulated_lowrank_grad_x(emu, M, K, r, p, dtype):
    grad_h = torch.randn(M, r, dtype=dtype)  # the accumulation type of f32 and f64 is the type itself
    A = torch.randn(K, r, dtype=dtype).t()  # (r, K), non-contiguous
    grad_x = torch.randn(M, K, dtype=dtype)
    expected = grad_x.double() + _dropped(grad_h.double() @ A.double(), p, SEED)
    getattr(emu, f"emu_lowrank_grad_x_{_SUFFIX[dtype]}")(
        _ptr(grad_h), _ptr(A), *_i64(*A.stride()), _ptr(grad_x), *_i64(grad_x.stride(0), M, K, r), *_drop_args(p, SEED))
    _close(grad_x, expected, dtype, "grad_x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rows_per_split", [32, 64, 1024])
@pytest.mark.parametrize("M, K, r", EMU_SHAPES)
def test_emulated_dropout_grad_a(emu, M, K, r, rows_per_split, p, dtype):
    grad_h = torch.randn(M, r, dtype=dtype)
    x = torch.randn(M, 2 * K, dtype=dtype)[:, ::2]  # column stride 2
    splits = -(-M // rows_per_split)
    partial = torch.full((splits, r, K), float("nan"), dtype=dtype)
    getattr(emu, f"emu_dropout_grad_a_{_SUFFIX[dtype]}")(
        _ptr(grad_h), _ptr(x), *_i64(*x.stride()), _ptr(partial), *_i64(M, K, r, splits, rows_per_split),
        *_drop_args(p, SEED))
    _close(partial.sum(0), grad_h.double().T @ _dropped(x, p, SEED), dtype, "grad_A")


# -- availability here -------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given without a CUDA device")
def test_unavailable_without_cuda_kernels_or_device_says_why():
    ok, reason = CUDA.available()
    assert not ok
    if torch.version.cuda is None:
        assert "CPU-only build" in reason or "not built" in reason, reason
    status = {(s.op, s.backend): s for s in peftcore.backends()}
    assert status["lora_linear", "cuda"].reason == reason and not status["lora_linear", "cuda"].available
    with pytest.raises(BackendUnavailableError, match="the 'cuda' backend of lora_linear is unavailable"):
        dispatch.select("lora_linear", "cuda", "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dispatch.select("lora_linear", "cuda", "auto").backend == "reference"
    assert "CUDA_HOME" in CUDA.hint


# -- on a GPU ----------------------------------------------------------------------------------

GPU_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GPU_SHAPES = [((3, 37), 129, 65, 1), ((3, 37), 129, 65, 16), ((111,), 32, 20, 8), ((5,), 64, 70, 40)]


def _gpu_run(backend, x, W, b, A, B, p, seed, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, b, A, B)]
    y = lora.lora_linear(leaves[0], W, leaves[1], leaves[2], leaves[3], 0.5, p, seed, backend=backend)
    y.backward(grad_out)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_backends_match_reference(backend, shape, p, dtype):
    ok, reason = dispatch._kernels("lora_linear")[backend].available()
    assert ok, reason  # on a GPU machine both must be built and runnable
    lead, K, N, r = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, K, generator=g).to("cuda", dtype)
    W = (torch.randn(K, N, generator=g) * K**-0.5).to("cuda", dtype).t()  # transposed view, as GPT-2
    b = torch.randn(N, generator=g).to("cuda", dtype)
    A = (torch.randn(r, K, generator=g) * K**-0.5).to("cuda", dtype)
    B = torch.randn(N, r, generator=g).to("cuda", dtype)
    grad_out = torch.randn(*lead, N, generator=g).to("cuda", dtype)
    seed = 0xC0FFEE
    got = _gpu_run(backend, x, W, b, A, B, p, seed, grad_out)
    ref = _gpu_run("reference", *(t.double() for t in (x, W, b, A, B)), p, seed, grad_out.double())
    for name, a, e in zip(("y", "dx", "dbias", "dA", "dB"), got, ref):
        assert a.dtype == dtype, name
        tol = GPU_TOL[dtype] * max(1.0, e.abs().max().item())
        assert (a.double() - e).abs().max().item() <= tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("K", [29, 64])
def test_gpu_masks_are_the_philox_mask(K):
    # With A = I, h = dropout(x): its zeros are the dropped elements, on both GPU backends.
    from peftcore.ops import lora_triton

    assert CUDA.available()[0] and lora_triton.TRITON.available()[0]
    M, p, seed = 77, 0.4, 2**63 + 5
    x = torch.rand(M, K, device="cuda") + 0.5  # no zeros of its own
    eye = torch.eye(K, device="cuda")
    W, B = torch.zeros(3, K, device="cuda"), torch.zeros(3, K, device="cuda")
    expected = philox.keep_mask(seed, (M, K), p)
    _, h_cuda = torch.ops.peftcore.lora_linear(x, W, None, eye, B, 1.0, p, torch.tensor(seed - 2**64))
    _, h_triton = lora_triton.lora_forward(x, W, None, eye, B, 1.0, p, seed)
    assert torch.equal((h_cuda != 0).cpu(), expected)
    assert torch.equal((h_triton != 0).cpu(), expected)
