"""The conformance kit on tiny models whose linear layers are quantized (nf4, fp4, int8, torchao int8)."""

from __future__ import annotations

import pytest

from peftcore.testing import CHECKS, check_method

from _models import quantized_llama

# Checks that cannot hold over a quantized base, and why:
SKIP = {
    # merge requantizes: outputs move by the requantization error (bounded, tested in
    # test_layers.py), not within the kit's 1e-5; torchao refuses to merge.
    "merge": "requantizing the merged weight is lossy",
    # the quantized weights keep their storage under .to(float64)/.to(bfloat16) (bitsandbytes'
    # 4-bit compute dtype is fixed at quantization).
    "dtype": "quantized storage does not follow .to(dtype)",
}


def _factory(kind: str):
    return lambda: quantized_llama(kind)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8", "torchao-int8"])
def test_lora_on_a_quantized_model_passes_the_kit(kind):
    report = check_method("lora", _factory(kind), rank=4, dropout=0.1, skip=tuple(SKIP))
    assert report.passed == [c for c in CHECKS if c not in SKIP], str(report)
