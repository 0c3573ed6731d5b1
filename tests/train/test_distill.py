"""Knowledge distillation: the loss against a hand computation, and ``finetune --teacher``: the
student's KL to the teacher falls and its accuracy approaches the teacher's on the bundled data."""

import json

import pytest
import torch
from torch.nn import functional as F

from peftcore.cli import main
from peftcore.errors import ConfigError
from peftcore.train.distill import DistillBatch, DistillationLoss, distillation_loss, kl_to_teacher
from train_models import tiny_bert, token_batches, write_subset

pytestmark = pytest.mark.usefixtures("single_thread")


def _by_hand(student, teacher, labels, t, a):
    p_teacher = torch.softmax(teacher / t, -1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, -1))).sum(-1).mean()  # summed over classes
    return a * F.cross_entropy(student, labels) + (1 - a) * t * t * kl


@pytest.mark.parametrize("t, a", [(1.0, 0.5), (4.0, 0.0), (2.0, 1.0), (3.0, 0.3)])
def test_loss_matches_the_formula(t, a):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=g, requires_grad=True)
    teacher = torch.randn(6, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (6,), generator=g)
    got = distillation_loss(student, teacher, labels, t, a)
    torch.testing.assert_close(got, _by_hand(student, teacher.detach(), labels, t, a))
    got.backward()
    assert teacher.grad is None and student.grad is not None  # the teacher does not learn


def test_pure_distillation_of_identical_logits_is_zero():
    logits = torch.randn(4, 3)
    assert distillation_loss(logits, logits, None, 2.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("t, a, message", [(0.0, 0.5, "--temperature must be positive"), (2.0, 1.5, "--distill-weight must be in")])
def test_bad_options(t, a, message):
    with pytest.raises(ConfigError, match=message):
        DistillationLoss(None, t, a)


def test_loss_fn_with_a_live_teacher_trains_the_student_towards_it():
    teacher, student = tiny_bert(seed=1), tiny_bert(seed=2)
    batches = token_batches(4)
    loss_fn = DistillationLoss(teacher, temperature=2.0, weight=0.0)
    with torch.no_grad():
        with_logits = [DistillBatch(b.inputs, b.labels, teacher(**b.inputs).logits) for b in batches]
    before = kl_to_teacher(student, with_logits)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(5):
        for batch in batches:
            optimizer.zero_grad()
            loss_fn(student.train(), batch).backward()
            optimizer.step()
    assert kl_to_teacher(student, with_logits) < 0.5 * before
    assert all(p.grad is None for p in teacher.parameters())


def _distill_runs(tmp_path, teacher_args, student_args, model_args=()):
    train, val = write_subset(tmp_path, 8, 4)
    common = ["finetune", "--no-progress", *model_args, "--data", str(train), "--validation-data", str(val)]
    teacher = tmp_path / "teacher"
    assert main(common + [*teacher_args, "--out", str(teacher)]) == 0
    student = tmp_path / "student"
    assert main(common + [*student_args, "--teacher", str(teacher), "--out", str(student)]) == 0
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["teacher"]["accuracy"] == json.loads((teacher / "metrics.json").read_text())["accuracy_after"]
    return common, metrics


def test_finetune_teacher_run_dir_kl_falls(tmp_path, tiny_model_dir, capsys):
    """Plumbing on a tiny random BERT (which learns little of the texts): the student's KL to the
    teacher on the validation data falls."""
    common, metrics = _distill_runs(tmp_path, ["--strategy", "full", "--lr", "3e-2", "--epochs", "3"],
                                    ["--strategy", "lora", "--epochs", "4", "--seed", "3", "--temperature", "2", "--distill-weight", "0"],
                                    ["--model", str(tiny_model_dir)])
    assert "teacher:" in capsys.readouterr().out
    info, kls = metrics["teacher"], [h["val_kl_to_teacher"] for h in metrics["history"]]
    assert kls[-1] < 0.5 * info["kl_before"], (info, kls)
    # a directory that is not a run is refused before anything is written
    assert main(common + ["--teacher", str(tmp_path), "--out", str(tmp_path / "bad")]) == 2
    assert "is not a 'peftcore finetune' run directory" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_student_approaches_the_teacher_on_the_bundled_data(tmp_path):
    """all-MiniLM-L6-v2 + LoRA teaches a head on the frozen encoder (feature-extraction), from its
    soft targets only (weight 0): the KL falls and the student's accuracy gets close to the teacher's."""
    _, metrics = _distill_runs(tmp_path, ["--strategy", "lora", "--epochs", "3", "--lr", "3e-3"],
                               ["--strategy", "feature-extraction", "--epochs", "6", "--temperature", "2", "--distill-weight", "0"])
    info, kls = metrics["teacher"], [h["val_kl_to_teacher"] for h in metrics["history"]]
    assert info["accuracy"] >= 0.7, info  # 0.75 measured (3 epochs on 40 texts)
    assert kls[-1] < 0.5 * info["kl_before"] and kls[-1] < kls[0], (info, kls)
    assert metrics["accuracy_after"] >= info["accuracy"] - 0.1 > metrics["accuracy_before"] + 0.3, (info, metrics["accuracy_after"])
