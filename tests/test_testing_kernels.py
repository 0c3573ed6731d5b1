"""The kernel kit: built-in backends pass ``check_kernel``, and each kind of wrong kernel fails
the check meant to catch it, with a message naming that check.

Every wrong kernel below is the reference with one deliberate bug.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from peftcore.errors import BackendUnavailableError, ConfigError
from peftcore.ops import philox
from peftcore.ops.lora import REFERENCE, reference_lora_linear
from peftcore.testing import KERNEL_CHECKS, check_kernel


class _Kernel:
    """A pure-PyTorch ``lora_linear`` kernel object, like a plugin's."""

    op = "lora_linear"
    backend = "probe"
    devices = ("cpu",)
    priority = 0
    hint = ""
    seed_tensor = True
    peftcore_api = 1

    def available(self):
        return True, ""

    def __call__(self, x, weight, bias, A, B, scale, dropout_p=0.0, seed=0):
        return reference_lora_linear(x, weight, bias, A, B, scale, dropout_p, seed)


class _WrongScale(_Kernel):
    def __call__(self, x, weight, bias, A, B, scale, dropout_p=0.0, seed=0):
        return reference_lora_linear(x, weight, bias, A, B, scale * 1.01, dropout_p, seed)


class _WrongGradient(_Kernel):
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A):
            ctx.save_for_backward(x, A)
            return x @ A.t()

        @staticmethod
        def backward(ctx, grad):
            x, A = ctx.saved_tensors
            return grad @ A, 2 * grad.t() @ x  # the gradient of A is twice what it should be

    def __call__(self, x, weight, bias, A, B, scale, dropout_p=0.0, seed=0):
        y = torch.nn.functional.linear(x, weight, bias)
        if dropout_p > 0.0:
            x = x * philox.keep_mask(seed, x.shape, dropout_p, x.device).to(x.dtype) / (1.0 - dropout_p)
        return y + scale * self.Fn.apply(x, A) @ B.t()


class _ColumnMajorMask(_Kernel):
    def __call__(self, x, weight, bias, A, B, scale, dropout_p=0.0, seed=0):
        y = torch.nn.functional.linear(x, weight, bias)
        if dropout_p > 0.0:  # offsets counted down the columns: a different mask than the spec's
            keep = philox.keep_mask(seed, x.shape[::-1], dropout_p, x.device).t()
            x = x * keep.to(x.dtype) / (1.0 - dropout_p)
        return y + scale * (x @ A.t()) @ B.t()


class _UnsignedSeed(_Kernel):
    def __call__(self, x, weight, bias, A, B, scale, dropout_p=0.0, seed=0):
        return reference_lora_linear(x, weight, bias, A, B, scale, dropout_p, seed.abs())  # loses negative seeds


class _AssumesContiguous(_Kernel):
    def __call__(self, x, weight, bias, A, B, scale, dropout_p=0.0, seed=0):
        x = torch.as_strided(x, x.shape, (x.shape[1], 1))  # reads memory as if x were contiguous
        return reference_lora_linear(x, weight, bias, A, B, scale, dropout_p, seed)


class _NoEmptyBatch(_Kernel):
    def __call__(self, x, weight, bias, A, B, scale, dropout_p=0.0, seed=0):
        x = x / x.abs().amax(dim=0) * x.abs().amax(dim=0)  # amax over zero rows raises
        return reference_lora_linear(x, weight, bias, A, B, scale, dropout_p, seed)


class _GraphBreak(_Kernel):
    def __call__(self, x, weight, bias, A, B, scale, dropout_p=0.0, seed=0):
        torch._dynamo.graph_break()
        return reference_lora_linear(x, weight, bias, A, B, scale, dropout_p, seed)


@pytest.mark.parametrize("kernel, check, match", [
    (_WrongScale(), "forward", r"output, torch.float32, \(M, K, N, r\) = \(1, 1, 1, 1\)"),
    (_WrongGradient(), "gradients", "gradient of A, torch.float32"),
    (_ColumnMajorMask(), "dropout_mask", r"elements differ from peftcore.ops.philox.keep_mask"),
    (_UnsignedSeed(), "seeds", r"seed -1, .* elements differ"),
    (_AssumesContiguous(), "noncontiguous", "transposed x and weight"),
    (_NoEmptyBatch(), "empty_batch", r"torch.float32, M = 0, dropout_p=0.0: the kernel raised IndexError"),
    (_GraphBreak(), "compile", r"torch.compile\(backend='aot_eager', fullgraph=True\) of the kernel failed"),
])
def test_each_kind_of_wrong_kernel_fails_its_check(kernel, check, match):
    with pytest.raises(AssertionError, match=rf"check_kernel\('lora_linear', 'probe'\) on cpu: 1 check\(s\) failed:\n"
                                             rf"  check '{check}' failed: .*{match}") as info:
        check_kernel("lora_linear", kernel, dtypes=[torch.float32], skip=[c for c in KERNEL_CHECKS if c != check])
    assert list(info.value.report.failed) == [check]


def test_a_wrong_kernel_fails_every_check_its_bug_shows_in_and_passes_the_others():
    with pytest.raises(AssertionError) as info:
        check_kernel("lora_linear", _UnsignedSeed(), dtypes=[torch.float32], skip=["compile"])
    report = info.value.report
    assert list(report.failed) == ["seeds"] and "check 'seeds' failed" in str(info.value)
    assert report.passed == ["forward", "gradients", "dropout_mask", "noncontiguous", "empty_batch"]
    assert report.skipped == {"opcheck": "the kernel calls no torch.library op", "compile": "skip= asked for it"}


def test_a_correct_pure_pytorch_kernel_passes_and_seed_ints_work():
    kernel = _Kernel()
    kernel.seed_tensor = False  # gets Python ints, negative ones included
    report = check_kernel("lora_linear", kernel, dtypes=[torch.float32, torch.float64])
    assert report.passed == [c for c in KERNEL_CHECKS if c != "opcheck"], str(report)
    assert "probe on cpu (float32, float64)" in str(report)


def test_the_cpp_backend_passes_including_opcheck():
    report = check_kernel("lora_linear", "cpp")
    assert report.passed == list(KERNEL_CHECKS), str(report)
    assert "peftcore.lora_linear.default" in report.results["opcheck"]
    assert report.max_abs_diff["dropout_mask"] < 1e-5


@pytest.mark.slow
def test_the_reference_backend_passes():
    report = check_kernel("lora_linear", "reference")
    assert set(report.passed) == set(KERNEL_CHECKS) - {"opcheck"}, str(report)
    assert check_kernel("lora_linear", REFERENCE, dtypes=[torch.float32], skip=["compile"]).passed


TRITON = """
import torch
from peftcore.testing import check_kernel
report = check_kernel("lora_linear", "triton", dtypes=[torch.float32], shapes=[(1, 1, 1, 1), (5, 7, 3, 2)],
                      seeds=(0, -1, 2**62 + 3), skip=["compile"])
print(report)
"""


@pytest.mark.slow
@pytest.mark.triton
def test_the_triton_backend_passes_in_the_interpreter_with_tiny_shapes():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", TRITON], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "forward        passed" in done.stdout and "dropout_mask   passed" in done.stdout


def test_kit_argument_errors_are_clear():
    with pytest.raises(ConfigError, match="op 'bottleneck' is not covered"):
        check_kernel("bottleneck", "reference")
    with pytest.raises(ConfigError, match="unknown check.*'speed'"):
        check_kernel("lora_linear", "reference", skip=["speed"])
    with pytest.raises(ConfigError, match=r"\(M, K, N, r\) tuples"):
        check_kernel("lora_linear", "reference", shapes=[(0, 1, 1, 1)])
    gpu_only = _Kernel()
    gpu_only.devices = ("cuda",)
    gpu_only.available = lambda: (False, "no CUDA device")
    with pytest.raises(BackendUnavailableError, match="unavailable: no CUDA device"):
        check_kernel("lora_linear", gpu_only)
