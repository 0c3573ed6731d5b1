"""Progressive unfreezing follows its schedule, per epoch and every K steps, and frozen stages do not move."""

import pytest
import torch

from peftcore.errors import ConfigError
from peftcore.train import ProgressiveUnfreezer, apply_strategy, build_optimizer, train_epoch
from train_models import tiny_bert, token_batches

pytestmark = pytest.mark.usefixtures("single_thread")


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _stage_names(plan, upto):
    return {n for stage in plan.stages[:upto + 1] for n in stage}


def test_stages_of_a_three_block_model():
    model = tiny_bert(layers=3)
    plan = apply_strategy(model, "progressive")
    assert len(plan.stages) == 5  # head, block 2 (+ pooler), block 1, block 0, embeddings
    assert plan.stages[0] == ("classifier.weight", "classifier.bias")
    assert all(n.startswith("bert.encoder.layer.2.") or n.startswith("bert.pooler.") for n in plan.stages[1])
    assert all(n.startswith("bert.encoder.layer.0.") for n in plan.stages[3])
    assert all(n.startswith("bert.embeddings.") for n in plan.stages[4])


def test_per_epoch_schedule():
    model = tiny_bert(layers=3)
    plan = apply_strategy(model, "progressive")
    unfreezer = ProgressiveUnfreezer(model, plan)
    for epoch in range(7):
        unfreezer.start_epoch(epoch)
        assert _trainable(model) == _stage_names(plan, min(epoch, 4)), epoch
        assert unfreezer.stage == min(epoch, 4)
        unfreezer.step()  # steps do nothing in per-epoch mode
        assert unfreezer.stage == min(epoch, 4)


def test_every_k_steps_schedule_during_training():
    model = tiny_bert(layers=3)
    plan = apply_strategy(model, "progressive", lr=1e-2)
    unfreezer = ProgressiveUnfreezer(model, plan, every_steps=2)
    optimizer = build_optimizer(plan.param_groups())
    seen = []

    def on_step(step, loss, seconds):
        unfreezer.step()
        seen.append((unfreezer.steps, unfreezer.stage, frozenset(_trainable(model))))

    unfreezer.start_epoch(0)  # no effect in step mode
    assert unfreezer.stage == 0
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_epoch(model, token_batches(8), optimizer, progress=False, on_step=on_step)
    assert [(s, stage) for s, stage, _ in seen] == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3), (7, 3), (8, 4)]
    for _, stage, trainable in seen:
        assert trainable == _stage_names(plan, stage)
    # embeddings unfroze only after the last step: they never moved; the head moved from the start
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters() if n.startswith("bert.embeddings."))
    assert not torch.equal(model.classifier.weight, snapshot["classifier.weight"])


def test_frozen_stage_gets_no_update_until_unfrozen():
    model = tiny_bert(layers=2)
    plan = apply_strategy(model, "progressive", lr=1e-2)
    unfreezer = ProgressiveUnfreezer(model, plan)
    optimizer = build_optimizer(plan.param_groups())
    top = "bert.encoder.layer.1.output.dense.weight"
    start = dict(model.named_parameters())[top].detach().clone()
    unfreezer.start_epoch(0)
    train_epoch(model, token_batches(2), optimizer, progress=False)
    assert torch.equal(dict(model.named_parameters())[top], start)
    unfreezer.start_epoch(1)
    train_epoch(model, token_batches(2), optimizer, progress=False)
    assert not torch.equal(dict(model.named_parameters())[top], start)


def test_creating_an_unfreezer_resets_to_stage_zero_and_checks_the_model():
    model = tiny_bert(layers=2)
    plan = apply_strategy(model, "progressive")
    for p in model.parameters():
        p.requires_grad_(True)
    ProgressiveUnfreezer(model, plan)
    assert _trainable(model) == set(plan.stages[0])
    with pytest.raises(ConfigError, match="the plan names parameters the model lacks"):
        ProgressiveUnfreezer(torch.nn.Linear(2, 2), plan)
    with pytest.raises(ConfigError, match="every_steps must be >= 0"):
        ProgressiveUnfreezer(model, plan, every_steps=-1)
