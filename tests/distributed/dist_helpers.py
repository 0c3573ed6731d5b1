"""Helpers of tests/distributed: runs scripts on 2 CPU ranks (gloo) through torch's launcher, with a timeout so nothing hangs.

Each launch costs a few seconds of interpreter and import start-up per rank, so every script
checks several things in one launch and prints one ``RESULT {json}`` line from rank 0.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ROOT = Path(__file__).resolve().parents[2]


def _env(extra=None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def run_command(command, timeout=240, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Runs ``command``; a run past ``timeout`` seconds fails the test (its process group is killed)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(env), cwd=cwd,
                              start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(map(str, command))} ran past {timeout} s:\n{exc.stdout}\n{exc.stderr}")


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def torchrun(script: str, *args, nproc: int = 2, timeout: int = 240, env=None) -> dict:
    """Runs ``scripts/<script>`` on ``nproc`` ranks with ``python -m torch.distributed.run``; returns rank 0's RESULT."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", str(SCRIPTS / script), *map(str, args)]
    return result_of(run_command(command, timeout=timeout, env=env))
