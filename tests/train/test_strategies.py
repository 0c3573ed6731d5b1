"""Each strategy freezes and unfreezes exactly what it says, parameter by parameter, and its
optimizer groups carry the right rates and weight decay."""

import re

import pytest
import torch

import peftcore
from models import minilm
from peftcore.errors import ConfigError, TargetError
from peftcore.train import apply_strategy, build_optimizer
from peftcore.train.strategies import DEFAULT_LR, StrategyConfig, strategies
from train_models import tiny_bert, token_batches

LAYER = re.compile(r"bert\.encoder\.layer\.(\d+)\.")


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _expected(model, keep):
    return {n for n, _ in model.named_parameters() if keep(n)}


def _block(name):
    match = LAYER.match(name)
    return int(match.group(1)) if match else None


def _check_groups(model, plan):
    """Every planned parameter in exactly one group; no_decay groups hold the vectors, others the matrices."""
    seen = [id(p) for g in plan.groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    for group in plan.groups:
        if group["name"].endswith(".no_decay"):
            assert group["weight_decay"] == 0.0 and all(p.ndim < 2 for p in group["params"])
        else:
            assert group["weight_decay"] == 0.01 and all(p.ndim >= 2 for p in group["params"])
    names = dict((id(p), n) for n, p in model.named_parameters())
    assert {names[i] for i in seen} == set(plan.names.values())


def test_full_trains_everything():
    model = minilm()
    plan = apply_strategy(model, "full")
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    assert {g["lr"] for g in plan.groups} == {DEFAULT_LR["full"]}
    _check_groups(model, plan)


def test_feature_extraction_trains_only_the_head():
    model = minilm()
    plan = apply_strategy(model, "feature-extraction", lr=0.01)
    assert _trainable(model) == {"classifier.weight", "classifier.bias"}
    assert [g["name"] for g in plan.groups] == ["head", "head.no_decay"]
    _check_groups(model, plan)


@pytest.mark.parametrize("count, expected_frozen_blocks", [(2, {0, 1}), (None, {0, 1, 2}), (6, set(range(6)))])
def test_partial_freezes_embeddings_and_bottom_blocks(count, expected_frozen_blocks):
    model = minilm()
    plan = apply_strategy(model, "partial", freeze_blocks=count)
    expected = _expected(model, lambda n: not n.startswith("bert.embeddings.") and _block(n) not in expected_frozen_blocks)
    assert _trainable(model) == expected
    assert "bert.pooler.dense.weight" in expected and "classifier.bias" in expected
    _check_groups(model, plan)


def test_partial_by_regex_and_by_names():
    model = minilm()
    apply_strategy(model, "partial", freeze=r".*\.attention\..*")
    assert _trainable(model) == _expected(model, lambda n: ".attention." not in n)
    model = minilm()
    apply_strategy(model, "partial", freeze=["bert.embeddings", "intermediate"], freeze_blocks=1)
    assert _trainable(model) == _expected(
        model, lambda n: not n.startswith("bert.embeddings.") and ".intermediate." not in n and _block(n) != 0)


def test_progressive_starts_with_the_head_and_lists_stages_top_down():
    model = minilm()
    plan = apply_strategy(model, "progressive", blocks_per_stage=2)
    assert _trainable(model) == {"classifier.weight", "classifier.bias"}
    assert plan.stages[0] == ("classifier.weight", "classifier.bias")
    assert {_block(n) for n in plan.stages[1] if _block(n) is not None} == {4, 5}
    assert "bert.pooler.dense.weight" in plan.stages[1]
    assert {_block(n) for n in plan.stages[2]} == {2, 3}
    assert {_block(n) for n in plan.stages[3]} == {0, 1}
    assert all(n.startswith("bert.embeddings.") for n in plan.stages[4]) and len(plan.stages) == 5
    # every stage is in the optimizer from the start, at one rate unless lr_decay is given; the
    # head, which trains alone first, at 10 times that rate
    assert set(plan.names.values()) == {n for n, _ in model.named_parameters()}
    rates = plan.learning_rates()
    assert {rates[n] for n in rates if not n.startswith("classifier.")} == {DEFAULT_LR["progressive"]}
    assert rates["classifier.weight"] == rates["classifier.bias"] == pytest.approx(10 * DEFAULT_LR["progressive"])
    _check_groups(model, plan)


def test_discriminative_rates_follow_the_decay():
    model = minilm()
    plan = apply_strategy(model, "discriminative", lr=1e-3, lr_decay=0.5)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    rates = plan.learning_rates()
    for name, _ in model.named_parameters():
        block = _block(name)
        if name.startswith("bert.embeddings."):
            expected = 1e-3 * 0.5 ** 6
        elif block is not None:
            expected = 1e-3 * 0.5 ** (5 - block)
        else:  # pooler (with the top block) and classifier
            expected = 1e-3
        assert rates[name] == pytest.approx(expected, rel=1e-12), name
    _check_groups(model, plan)
    # the schedule scales every group alike: the ratios survive a scheduler step
    from peftcore.train import build_scheduler

    optimizer = build_optimizer(plan.param_groups())
    scheduler = build_scheduler(optimizer, "cosine", total_steps=10, warmup_steps=2)
    optimizer.step()
    scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["block.4"] / lrs["block.5"] == pytest.approx(0.5)
    assert lrs["embeddings"] / lrs["head"] == pytest.approx(0.5 ** 6)


def test_head_lr_gives_the_head_its_own_rate():
    model = minilm()
    plan = apply_strategy(model, "partial", lr=1e-4, head_lr=3e-3)
    rates = plan.learning_rates()
    assert rates["classifier.weight"] == 3e-3 and rates["bert.pooler.dense.weight"] == 1e-4
    assert [g["name"] for g in plan.groups] == ["body", "body.no_decay", "head", "head.no_decay"]


def test_lora_strategy_wraps_and_trains_the_head():
    model = minilm()
    plan = apply_strategy(model, "lora", method_options={"rank": 2})
    assert plan.method == "lora"
    trainable = _trainable(model)
    assert trainable == {n for n in trainable if ".lora_" in n} | {"classifier.weight", "classifier.bias"}
    assert len([n for n in trainable if ".lora_" in n]) == 2 * 37  # A and B on every linear but the classifier
    assert set(plan.names.values()) == trainable
    assert peftcore.summary(model).trainable == sum(p.numel() for _, p in plan.named_parameters())


def test_one_optimizer_step_changes_exactly_the_trainable_parameters():
    model = tiny_bert()
    plan = apply_strategy(model, "partial", freeze_blocks=2, lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(plan.param_groups(), lr=123.0)  # each group's own lr wins
    batch = token_batches(1)[0]
    torch.nn.functional.cross_entropy(model(**batch.inputs).logits, batch.labels).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == _trainable(model)
    assert all(g["lr"] == 1e-2 for g in optimizer.param_groups)


def test_unknown_strategy_lists_the_available_ones():
    model = minilm()
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; available: .*lora.*full, feature-extraction, partial"):
        apply_strategy(model, "nope")
    assert not peftcore.adapters(model)


@pytest.mark.parametrize("overrides, error, match", [
    ({"freeze_blocks": 7}, ConfigError, "freeze_blocks=7 but the model has 6 blocks"),
    ({"lr_decay": 1.5}, ConfigError, r"lr_decay must be in \(0, 1\]"),
    ({"lr": 0.0}, ConfigError, "learning rates must be positive"),
    ({"head_lr": -1.0}, ConfigError, "learning rates must be positive"),
    ({"freeze": "(bad"}, ConfigError, "not a valid regular expression"),
    ({"head": ["missing"]}, TargetError, "head name 'missing' matches no module"),
])
def test_bad_options_leave_the_model_unchanged(overrides, error, match):
    model = minilm()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        apply_strategy(model, StrategyConfig(name="partial", **overrides))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_strategies_lists_methods_then_layer_strategies():
    names = strategies()
    assert "lora" in names and names[-5:] == ["full", "feature-extraction", "partial", "progressive", "discriminative"]
    assert all(m in names for m in peftcore.methods())
