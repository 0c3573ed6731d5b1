"""The CUDA kernels of ``lora_grouped`` (``csrc/cuda/lora_grouped*.cu*``), checked as far as each
machine allows: the kernels run on the CPU, one thread per CUDA thread
(``tests/ops/cuda_grouped_emulation.cpp``, launched as ``lora_grouped.cu`` launches them), against
the reference, mask included; with nvcc the sources compile (the torch-facing file as a slow
test); on a GPU (``gpu``) the op itself against the reference."""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from peftcore.ops import lora_grouped, philox

REPO = Path(__file__).resolve().parents[2]
CUDA_DIR = REPO / "csrc" / "cuda"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SEED = 2**64 - 987654321  # high bit set: the key's upper word matters


def _compile(cmd: list[str], what: str, timeout: int) -> None:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{what} failed:\n{(run.stdout + run.stderr)[-4000:]}"


@functools.lru_cache(maxsize=None)
def _emulation(build_dir: str) -> ctypes.CDLL:
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    lib = Path(build_dir) / "cuda_grouped_emulation.so"
    _compile([gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
              str(Path(__file__).with_name("cuda_grouped_emulation.cpp")), "-o", str(lib)],
             "g++ cuda_grouped_emulation.cpp", timeout=300)
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _emulation(str(tmp_path_factory.mktemp("cuda-grouped-emulation")))


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_emulated_kernels_match_reference(emu, dtype, p):
    suffix = {torch.float32: "f32", torch.float64: "f64"}[dtype]
    g = torch.Generator().manual_seed(0)
    M, K, N, ranks = 13, 19, 11, [3, 1, 5, 2]  # K not a multiple of 8; adapter 3 gets no row
    index = torch.tensor([0, 1, -1, 2, 0, 0, 1, -1, 2, 2, 0, 1, 0])
    x = torch.randn(M, K, generator=g, dtype=dtype)
    W = torch.randn(N, K, generator=g, dtype=dtype) * K**-0.5
    bias = torch.randn(N, generator=g, dtype=dtype)
    A = [torch.randn(r, K, generator=g, dtype=dtype) * K**-0.5 for r in ranks]
    B = [torch.randn(N, r, generator=g, dtype=dtype) for r in ranks]
    scales, ps = [0.5, 2.0, 1.25, 1.0], [p, 0.0, p / 2, p]
    dy = torch.randn(M, N, generator=g, dtype=dtype)
    G, R = len(ranks), max(ranks)
    addrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa: E731
    rank = torch.tensor(ranks, dtype=torch.int64)
    scale = torch.tensor(scales, dtype=dtype)
    thr = torch.tensor([philox.threshold(q) for q in ps], dtype=torch.int32)
    keep = torch.tensor([1.0 / (1.0 - q) for q in ps], dtype=dtype)
    drop = ctypes.c_int(int(p > 0))
    seed = ctypes.c_uint64(SEED)
    dims = [ctypes.c_int64(v) for v in (M, K, N, R, G)]

    y = torch.nn.functional.linear(x, W, bias).contiguous()  # the base GEMM, as ATen does it
    h = torch.zeros(M, R, dtype=dtype)
    A_addr, B_addr = addrs(A), addrs(B)
    getattr(emu, f"emu_grouped_forward_{suffix}")(
        _p(x), _p(index), _p(A_addr), _p(B_addr), _p(rank), _p(scale), _p(thr), _p(keep), _p(y), _p(h), *dims, drop, seed)

    rows = torch.argsort(index, stable=True)
    starts = torch.cumsum(torch.bincount(index + 1, minlength=G + 1), 0)  # starts[g]: first row of g
    gx = dy.mm(W).contiguous()
    gA = [torch.full_like(a, float("nan")) for a in A]
    gB = [torch.full_like(b, float("nan")) for b in B]
    gA_addr, gB_addr = addrs(gA), addrs(gB)
    getattr(emu, f"emu_grouped_backward_{suffix}")(
        _p(dy), _p(x), _p(h), _p(index), _p(rows), _p(starts), _p(A_addr), _p(B_addr), _p(gA_addr), _p(gB_addr),
        _p(rank), _p(scale), _p(thr), _p(keep), _p(gx), *dims, drop, seed)

    leaves = [t.double().requires_grad_() for t in (x, *A, *B)]
    want_y = lora_grouped.reference_lora_grouped(leaves[0], W.double(), bias.double(), leaves[1:5], leaves[5:],
                                                 scales, index, ps, SEED)
    want = torch.autograd.grad(want_y, leaves, dy.double())
    got = [gx, *gA, *gB]
    for name, g_, w_ in [("y", y, want_y), *zip(["grad_x"] + [f"grad_A{i}" for i in range(G)] + [f"grad_B{i}" for i in range(G)], got, want)]:
        tol = TOL[dtype] * max(1.0, w_.abs().max().item())
        err = (g_.double() - w_).abs().max().item()
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def _nvcc() -> str | None:
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_device_kernels_compile_with_nvcc(tmp_path):
    source = tmp_path / "instantiate.cu"
    source.write_text(
        '#include "lora_grouped_device.cuh"\n'
        "namespace d = peftcore::cuda::device;\n"
        "template __global__ void d::grouped_shrink_kernel<float, float>(const float*, const int64_t*, "
        "peftcore::cuda::GroupedAdapters<float>, bool, bool, uint64_t, float*, int64_t, int64_t, int64_t);\n"
    )
    _compile([_nvcc(), "-std=c++17", "-c", f"-I{CUDA_DIR}", str(source), "-o", str(tmp_path / "k.o")],
             "nvcc lora_grouped_device.cuh", timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_torch_bindings_compile_with_nvcc(tmp_path):
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    torch_include = Path(cpp_extension.include_paths()[0])
    # A CPU build of torch lacks the one header its CMake generates for CUDA builds (as in
    # tests/ops/test_lora_cuda.py); its whole content is this macro.
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, f"-I{tmp_path / 'shim'}")
    _compile([_nvcc(), "-std=c++20", "-O1", "-Xcompiler", "-fPIC", "--compile", "-arch=sm_80", "-DPEFTCORE_WITH_CUDA",
              *includes, str(CUDA_DIR / "lora_grouped.cu"), "-o", str(tmp_path / "lora_grouped.o")],
             "nvcc lora_grouped.cu", timeout=900)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gpu_op_matches_reference(p):  # pragma: no cover - needs a GPU
    from peftcore.ops import _extension

    if not _extension.load()[0] or not torch._C._dispatch_has_kernel_for_dispatch_key("peftcore::lora_grouped", "CUDA"):
        pytest.skip("peftcore._C has no CUDA kernels for lora_grouped")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 40, generator=g).cuda().requires_grad_()
    W = torch.randn(24, 40, generator=g).cuda()
    A = [torch.randn(r, 40, generator=g).cuda().requires_grad_() for r in (4, 8)]
    B = [torch.randn(24, r, generator=g).cuda().requires_grad_() for r in (4, 8)]
    index = torch.randint(-1, 2, (37,), generator=g).cuda()
    seed = torch.tensor(5)
    y, _ = torch.ops.peftcore.lora_grouped(x, W, None, A, B, [0.5, 2.0], index, [p, p], seed)
    want = lora_grouped.reference_lora_grouped(x, W, None, A, B, [0.5, 2.0], index, [p, p], 5)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
