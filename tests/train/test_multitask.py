"""Multi-task fine-tuning: a shared wrapped encoder with a classification and a regression head."""

import pytest
import torch

import peftcore
from peftcore.errors import CheckpointError, ConfigError
from peftcore.train import build_optimizer
from peftcore.train.data import Batch
from peftcore.train.multitask import MultiTaskModel, Task, evaluate_multitask, load_task, save_task, train_multitask, wrap_encoder

pytestmark = pytest.mark.usefixtures("single_thread")

TASKS = (Task("topic", "classification", num_labels=3, weight=1.0), Task("score", "regression", weight=2.0))


def encoder(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False)


def task_data(seed=0, n=4, batch=8, length=6):
    """topic: the first token mod 3; score: the share of tokens below 32 (a number in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    out = {"topic": [], "score": []}
    for _ in range(n):
        ids = torch.randint(1, 64, (batch, length), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        out["topic"].append(Batch(inputs, ids[:, 0] % 3))
        ids2 = torch.randint(1, 64, (batch, length), generator=g)
        out["score"].append(Batch({"input_ids": ids2, "attention_mask": torch.ones_like(ids2)}, (ids2 < 32).float().mean(1)))
    return out


def model(per_task=False, seed=0):
    m = MultiTaskModel(encoder(seed), TASKS, dropout=0.0)
    wrap_encoder(m, "lora", per_task=per_task, rank=4, dropout=0.0)
    return m


def _all_trainable(m):
    params = m.trainable_parameters()
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in params} == {n for n in names.values() if "lora_" in n or n.startswith("heads.")}
    return params


@pytest.mark.parametrize("sampling", ["all", "proportional"])
def test_training_lowers_every_tasks_loss(sampling):
    m = model()
    data = task_data()
    before = evaluate_multitask(m, data)
    losses = train_multitask(m, data, build_optimizer([{"params": _all_trainable(m), "lr": 1e-2}]), steps=40, sampling=sampling, progress=False)
    after = evaluate_multitask(m, data)
    for task in ("topic", "score"):
        assert after[task]["loss"] < 0.8 * before[task]["loss"], (task, before[task]["loss"], after[task]["loss"])
        assert losses[task]
    if sampling == "all":
        assert len(losses["topic"]) == len(losses["score"]) == 40
    assert {"accuracy", "macro_f1", "confusion"} <= set(after["topic"]) and {"mse", "mae", "r2"} <= set(after["score"])
    # the base encoder stayed frozen
    assert all(not p.requires_grad for n, p in m.encoder.named_parameters() if "lora_" not in n)


def test_loss_weight_zero_leaves_that_head_alone():
    m = MultiTaskModel(encoder(), (Task("topic", num_labels=3), Task("score", "regression", weight=0.0)), dropout=0.0)
    wrap_encoder(m, "lora", rank=4)
    start = m.heads["score"][1].weight.detach().clone()
    train_multitask(m, task_data(), build_optimizer([{"params": _all_trainable(m), "lr": 1e-2, "weight_decay": 0.0}]), steps=3, progress=False)
    assert torch.equal(m.heads["score"][1].weight, start)


def test_an_adapter_per_task_is_used_and_trained_only_by_its_task():
    m = model(per_task=True)
    assert set(peftcore.adapters(m.encoder)) == {"topic", "score"}
    data = task_data()
    for task, other in (("topic", "score"), ("score", "topic")):
        m.zero_grad(set_to_none=True)
        m.loss(task, data[task][0]).backward()
        assert peftcore.adapters(m.encoder)[task].active and not peftcore.adapters(m.encoder)[other].active
        grads = {n: p.grad for n, p in m.encoder.named_parameters() if "lora_" in n}
        own = [n for n in grads if n.endswith("." + task)]  # e.g. ...query.lora_A.topic
        assert own and all(grads[n] is not None for n in own)
        assert all(g is None for n, g in grads.items() if n not in own), task
    # and training with both tasks moves both adapters
    snapshot = {n: p.detach().clone() for n, p in m.encoder.named_parameters() if "lora_" in n}
    train_multitask(m, data, build_optimizer([{"params": _all_trainable(m), "lr": 1e-2}]), steps=3, progress=False)
    changed = {n for n, p in m.encoder.named_parameters() if "lora_" in n and not torch.equal(p, snapshot[n])}
    assert any(n.endswith(".topic") for n in changed) and any(n.endswith(".score") for n in changed)


@pytest.mark.parametrize("per_task", [False, True])
def test_each_task_saves_and_loads_on_its_own(tmp_path, per_task):
    m = model(per_task=per_task)
    data = task_data()
    train_multitask(m, data, build_optimizer([{"params": _all_trainable(m), "lr": 1e-2}]), steps=5, progress=False)
    m.eval()
    expected = {t: m(t, **data[t][0].inputs).detach() for t in ("topic", "score")}
    for task in ("topic", "score"):
        save_task(m, task, tmp_path / task)
        assert (tmp_path / task / "head.safetensors").is_file() and (tmp_path / task / "adapter" / "adapter_config.json").is_file()
    # one task alone onto a fresh, plain encoder
    fresh = MultiTaskModel(encoder(), TASKS, dropout=0.0).eval()
    assert load_task(fresh, tmp_path / "score") == "score"
    torch.testing.assert_close(fresh("score", **data["score"][0].inputs), expected["score"])
    load_task(fresh, tmp_path / "topic")
    torch.testing.assert_close(fresh("topic", **data["topic"][0].inputs), expected["topic"])


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="kind must be one of"):
        Task("x", "ranking")
    with pytest.raises(ConfigError, match="unique names"):
        MultiTaskModel(encoder(), (Task("a"), Task("a")))
    m = model()
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        m("nope", input_ids=torch.ones(1, 2, dtype=torch.long))
    save_task(m, "topic", tmp_path / "topic")
    other = MultiTaskModel(encoder(), (Task("topic", num_labels=4),))
    with pytest.raises(CheckpointError, match="classification task with 3 labels; the model's is classification with 4"):
        load_task(other, tmp_path / "topic")
    assert not peftcore.adapters(other.encoder)  # nothing was loaded
    with pytest.raises(ConfigError, match="need batches for every task"):
        train_multitask(m, {"topic": task_data()["topic"]}, build_optimizer([{"params": _all_trainable(m), "lr": 1e-2}]), steps=1, progress=False)
