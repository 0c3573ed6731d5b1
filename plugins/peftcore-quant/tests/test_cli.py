"""peftcore finetune --quantize: a tiny run through the command line (slow: a real encoder)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peftcore.errors import ConfigError
from peftcore.train.config import FinetuneConfig


def test_quantize_needs_a_peft_method():
    with pytest.raises(ConfigError, match="--quantize nf4 needs a PEFT method"):
        FinetuneConfig(strategy="full", quantize="nf4").validate()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4"])  # int8 (bitsandbytes Linear8bitLt) is several times slower on the CPU
def test_finetune_quantize_runs_and_learns(kind, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "peftcore", "finetune", "--quantize", kind, "--epochs", "1", "--max-length", "32",
           "--no-progress", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "validation accuracy after fine-tuning" in done.stdout + done.stderr
    files = {p.name for p in out.rglob("*")}
    assert "adapter_config.json" in files, files
