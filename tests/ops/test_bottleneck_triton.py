"""The Triton bottleneck backend against the reference: forward and every gradient.

On the CPU the kernels run in Triton's interpreter, which is switched on by ``TRITON_INTERPRET=1``
read when the kernels are defined. So the CPU check runs this file as a script in a subprocess
with the variable set (it never leaks into other tests) and reads a JSON report back. On a CUDA
machine the same checks also run in-process on the GPU, with larger shapes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

#: (leading dims, K, r, N, residual): loops over K (BLOCK_K 32) and N (BLOCK_N 64) with ragged ends,
#: r padded to 16/32/64, an empty batch.
INTERPRETER_SHAPES = [
    ((3, 5), 23, 5, 23, False),
    ((7,), 70, 20, 130, True),
    ((2, 9), 33, 40, 17, True),
    ((0,), 16, 4, 16, False),
]
GPU_SHAPES = INTERPRETER_SHAPES + [
    ((6, 42), 123, 17, 123, False),
    ((4, 128), 384, 64, 384, False),
    ((3, 77), 431, 100, 259, True),
]


def compare(shapes, dtypes, device, activations=None):
    """Runs every case; returns (number of comparisons, failure messages)."""
    sys.path.insert(0, str(HERE))
    from test_bottleneck import TOLERANCES, make_args, run

    from peftcore.ops import bottleneck as bn
    from peftcore.ops.bottleneck_triton import triton_bottleneck

    checked, failures = 0, []
    for dtype in dtypes:
        for activation in activations or list(bn.ACTIVATIONS):
            for shape in shapes:
                args = tuple(None if t is None else t.detach().to(device).requires_grad_() for t in make_args(*shape, dtype=dtype))
                y_ref, g_ref = run(bn.reference_bottleneck, args, 0.8, activation)
                y, g = run(triton_bottleneck, args, 0.8, activation)
                rtol, atol = TOLERANCES[dtype]
                for what, got, want in [("output", y, y_ref), *[(f"grad {i}", a, b) for i, (a, b) in enumerate(zip(g, g_ref))]]:
                    checked += 1
                    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
                    try:
                        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)
                    except AssertionError as exc:
                        failures.append(f"{dtype} {activation} {shape} {what}: {str(exc).splitlines()[-3:]}")
    return checked, failures


def _interpreter_report() -> dict:
    """The checks that need the interpreter's process (run as ``__main__`` with TRITON_INTERPRET=1)."""
    from peftcore.ops import bottleneck as bn
    from peftcore.ops import dispatch

    report = {}
    checked, failures = compare(INTERPRETER_SHAPES, [torch.float32], "cpu")
    more, more_failures = compare(INTERPRETER_SHAPES[:2], [torch.bfloat16], "cpu", activations=["gelu", "relu"])
    report["checked"], report["failures"] = checked + more, failures + more_failures
    report["auto_backend_on_cpu"] = dispatch.select("bottleneck", "cpu", "auto").backend

    # saved tensors: x, W_down, W_up and h (M, r) only
    from test_bottleneck import make_args

    x, W_down, b_down, W_up, b_up, res = make_args((12,), 10, 3, 7, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(list(t.shape)) or t, lambda t: t):
        bn.bottleneck(x, W_down, b_down, W_up, b_up, 1.0, "gelu", res, backend="triton")
    report["saved_shapes"] = sorted(saved)

    # a wrapped model on the triton backend computes what the reference backend computes
    sys.path.insert(0, str(HERE.parent))
    import peftcore
    from models import gpt2, token_inputs

    outputs = {}
    for backend in ("reference", "triton"):
        model = gpt2()
        peftcore.wrap(model, "adapter", size=6, placement="parallel", backend=backend)
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".bottleneck." in name:
                    p.normal_(0, 0.2)
        inputs = token_inputs()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]
        outputs[backend] = (loss.detach(), grads)
    (loss_ref, grads_ref), (loss_tri, grads_tri) = outputs["reference"], outputs["triton"]
    report["model_loss_diff"] = abs(loss_ref.item() - loss_tri.item())
    report["model_grad_diff"] = max((a - b).abs().max().item() for a, b in zip(grads_tri, grads_ref))
    report["model_grads"] = len(grads_ref)
    return report


@pytest.mark.triton
def test_triton_kernels_in_the_interpreter_match_the_reference():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failures"] == []
    # 4 shapes x 4 activations (fp32) + 2 shapes x 2 activations (bf16), each: output + 5 or 6 gradients
    assert report["checked"] >= 16 * 6 + 4 * 6
    assert report["auto_backend_on_cpu"] != "triton"  # auto never picks the interpreter
    assert report["saved_shapes"] == sorted([[12, 10], [3, 10], [7, 3], [12, 3]])
    assert report["model_grads"] == 4 * 2  # 2 parallel adapters x (down, up) x (weight, bias)
    assert report["model_loss_diff"] < 1e-5 and report["model_grad_diff"] < 1e-5


@pytest.mark.gpu
@pytest.mark.triton
def test_triton_kernels_on_cuda_match_the_reference():
    pytest.importorskip("triton")
    checked, failures = compare(GPU_SHAPES, [torch.float32, torch.bfloat16], "cuda")
    assert failures == [] and checked > 0


def test_triton_backend_is_unavailable_without_cuda_or_interpreter():
    from peftcore.ops.bottleneck_triton import INTERPRETED, TRITON

    ok, reason = TRITON.available()
    if torch.cuda.is_available() or INTERPRETED:
        assert ok
    else:
        assert not ok and ("CUDA" in reason or "triton" in reason)
        assert TRITON.devices == ("cuda",)


if __name__ == "__main__":
    print(json.dumps(_interpreter_report()))
