"""fp16 autocast with loss scaling: steps with inf/NaN gradients are skipped (nothing moves), the
scale recovers, the loss falls; bf16 and fp16 exclude each other."""

import json

import pytest
import torch

from peftcore.errors import ConfigError
from peftcore.cli import main
from peftcore.train import amp, apply_strategy, build_optimizer, train_epoch
from train_models import tiny_bert, token_batches, write_subset

pytestmark = pytest.mark.usefixtures("single_thread")


def _lora_model():
    model = tiny_bert()
    plan = apply_strategy(model, "lora", method_options={"rank": 4, "alpha": 8, "dropout": 0.0}, lr=1e-2)
    return model, plan


def _snapshot(plan):
    return {n: p.detach().clone() for n, p in plan.named_parameters()}


def test_steps_with_inf_gradients_are_skipped_and_move_nothing():
    model, plan = _lora_model()
    optimizer = build_optimizer(plan.param_groups())
    scaler = amp.make_scaler(model, fp16=True)
    poisoned = {2, 5}  # micro-batches whose gradients become inf (logits' gradient times inf)
    calls = {"n": 0}

    def loss_fn(model, batch):
        logits = model(**batch.inputs).logits
        if calls["n"] in poisoned:
            logits.register_hook(lambda grad: grad * float("inf"))
        calls["n"] += 1
        return torch.nn.functional.cross_entropy(logits.float(), batch.labels)

    before, applied = _snapshot(plan), []

    def on_step(step, loss, seconds):
        nonlocal before
        now = _snapshot(plan)
        moved = any(not torch.equal(now[n], before[n]) for n in now)
        assert all(torch.isfinite(p).all() for p in now.values()), f"non-finite parameter after step {step}"
        applied.append(moved)
        before = now

    stats = train_epoch(model, token_batches(8), optimizer, loss_fn=loss_fn, fp16=True, scaler=scaler, progress=False, on_step=on_step)
    assert stats.skipped == 2 and stats.steps == 8
    assert applied == [i not in poisoned for i in range(8)]
    assert stats.loss_scale == 2.0**16 / 4  # halved once per skipped step
    # AdamW's step count only counts applied steps
    assert max(int(s["step"]) for s in optimizer.state.values()) == 6


def test_an_overflowing_initial_scale_backs_off_then_trains():
    model, plan = _lora_model()
    optimizer = build_optimizer(plan.param_groups())
    scaler = amp.make_scaler(model, fp16=True, init_scale=2.0**40)  # fp16 gradients overflow at first
    start = _snapshot(plan)
    stats = train_epoch(model, token_batches(40), optimizer, fp16=True, scaler=scaler, progress=False)
    assert 0 < stats.skipped < 40 and stats.loss_scale < 2.0**40
    assert all(torch.isfinite(p).all() for _, p in plan.named_parameters())
    assert any(not torch.equal(p, start[n]) for n, p in plan.named_parameters())


def test_fp16_loss_falls_without_skipped_steps():
    torch.manual_seed(0)
    model, plan = _lora_model()
    optimizer = build_optimizer(plan.param_groups())
    scaler = amp.make_scaler(model, fp16=True)
    batches = token_batches(6)
    losses = []
    for _ in range(6):
        stats = train_epoch(model, batches, optimizer, fp16=True, scaler=scaler, progress=False)
        assert stats.skipped == 0
        losses.append(stats.loss)
    assert losses[-1] < 0.7 * losses[0], losses


def test_bf16_and_fp16_exclude_each_other():
    model, plan = _lora_model()
    with pytest.raises(ConfigError, match="--bf16 and --fp16"):
        train_epoch(model, token_batches(1), build_optimizer(plan.param_groups()), bf16=True, fp16=True, progress=False)


def test_finetune_fp16_records_the_scaler(tmp_path, tiny_model_dir, capsys):
    train, val = write_subset(tmp_path, 4, 2)
    out = tmp_path / "run"
    assert main(["finetune", "--no-progress", "--model", str(tiny_model_dir), "--data", str(train), "--validation-data", str(val),
                 "--epochs", "2", "--fp16", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "fp16" and metrics["skipped_steps"] == 0 and metrics["loss_scale"] == 2.0**16
    assert json.loads((out / "config.json").read_text())["fp16"] is True
    assert main(["finetune", "--no-progress", "--bf16", "--fp16", "--out", str(tmp_path / "r2")]) == 2
    assert "--bf16 and --fp16 exclude each other" in capsys.readouterr().err
