"""transformers' Trainer under torchrun and an Accelerate loop under ``accelerate launch``, 2 CPU ranks."""

import shutil
import sys
from pathlib import Path

import pytest
from dist_helpers import SCRIPTS, result_of, run_command, torchrun

pytestmark = pytest.mark.slow


def test_trainer_under_torchrun_trains_and_saves_a_loadable_adapter(tmp_path):
    got = torchrun("hf_train.py", "trainer", tmp_path)
    assert (got["world"], got["mode"]) == (2, "ParallelMode.DISTRIBUTED")
    assert got["moved"] > 1e-3
    assert got["loaded_diff"] == 0.0


def test_accelerate_launch_trains_and_saves_a_loadable_adapter(tmp_path):
    pytest.importorskip("accelerate")
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    # --cpu --num_processes 2 starts one process in accelerate 1.x (several CPU processes need an MPI
    # hostfile); --multi_gpu takes its torchrun path, and Accelerator(cpu=True) then joins with gloo.
    command = [launcher or "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPTS / "hf_train.py"), "accelerate", str(tmp_path)]
    got = result_of(run_command(command))
    assert (got["world"], got["mode"]) == (2, "DistributedDataParallel")
    assert got["moved"] > 1e-3
    assert got["loaded_diff"] == 0.0
