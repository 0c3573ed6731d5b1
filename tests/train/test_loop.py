"""The training loop: gradient accumulation, clipping, penalties, bf16 autocast, gradient
checkpointing, seeds, and divergence."""

import copy

import pytest
import torch
from torch import nn

import peftcore
from peftcore.train import DivergenceError, apply_strategy, build_optimizer, evaluate, train_epoch
from peftcore.train.data import Batch
from peftcore.train.finetune import enable_checkpointing, seed_everything
from train_models import tiny_bert, token_batches

pytestmark = pytest.mark.usefixtures("single_thread")


def _concat(batches):
    return Batch({k: torch.cat([b.inputs[k] for b in batches]) for k in batches[0].inputs}, torch.cat([b.labels for b in batches]))


def _sgd(model, lr=0.5):
    plan = apply_strategy(model, "full", lr=lr, weight_decay=0.0)
    return torch.optim.SGD(plan.param_groups(), lr=lr)


def test_accumulating_two_micro_batches_equals_one_batch_of_both():
    micro = token_batches(2, batch=4)
    a, b = tiny_bert(), tiny_bert()
    stats = train_epoch(a, micro, _sgd(a), accumulation=2, max_grad_norm=None, progress=False)
    train_epoch(b, [_concat(micro)], _sgd(b), accumulation=1, max_grad_norm=None, progress=False)
    assert stats.steps == 1 and len(stats.step_times) == 1
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_a_short_last_step_is_averaged_over_its_own_micro_batches():
    micro = token_batches(3, batch=4)
    a, b = tiny_bert(), tiny_bert()
    stats = train_epoch(a, micro, _sgd(a), accumulation=2, max_grad_norm=None, progress=False)
    assert stats.steps == 2
    optimizer = _sgd(b)
    train_epoch(b, [_concat(micro[:2]), micro[2]], optimizer, max_grad_norm=None, progress=False)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_clipping_bounds_the_update():
    model = tiny_bert()
    start = [p.detach().clone() for p in model.parameters()]
    train_epoch(model, token_batches(1), _sgd(model, lr=1.0), max_grad_norm=1e-3, progress=False)
    update = torch.sqrt(sum((p - s).square().sum() for p, s in zip(model.parameters(), start)))
    assert update.item() == pytest.approx(1e-3, rel=1e-3)


def test_penalty_joins_the_loss_and_its_gradient():
    model = tiny_bert()
    target = model.classifier.weight.detach().clone() + 1.0
    penalty = lambda: 10.0 * (model.classifier.weight - target).square().sum()  # noqa: E731
    before = penalty().item()
    stats = train_epoch(model, token_batches(2), _sgd(model, lr=1e-2), penalty=penalty, max_grad_norm=None, progress=False)
    assert stats.penalty == pytest.approx(before, rel=0.2) and stats.penalty > 0
    assert penalty().item() < before  # its gradient pulled the weights toward the target


def test_bf16_autocast_trains_on_the_cpu():
    model = tiny_bert()
    batches = token_batches(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(**batches[0].inputs).logits.dtype == torch.bfloat16
    optimizer = build_optimizer(apply_strategy(model, "full", lr=3e-3).param_groups())
    first = train_epoch(model, batches, optimizer, bf16=True, progress=False).loss
    for _ in range(6):
        last = train_epoch(model, batches, optimizer, bf16=True, progress=False).loss
    assert last < first and all(p.dtype == torch.float32 for p in model.parameters())
    report, loss = evaluate(model, batches, ["a", "b", "c"], bf16=True, progress=False)
    assert 0 <= report.accuracy <= 1 and loss == loss


def test_gradient_checkpointing_gives_the_same_gradients_with_frozen_embeddings():
    base = tiny_bert()
    peftcore.wrap(base, "lora", rank=2, dropout=0.0, trainable=["classifier"])
    with torch.no_grad():  # make the LoRA path non-zero so every LoRA matrix gets a gradient
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    checkpointed = copy.deepcopy(base)
    enable_checkpointing(checkpointed)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    batch = token_batches(1)[0]
    grads, calls = [], []
    for model in (base, checkpointed):
        model.train()
        count = []
        # the first linear of the block: recomputation stops early, before the block's own end
        model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *args: count.append(1))
        nn.functional.cross_entropy(model(**batch.inputs).logits, batch.labels).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        calls.append(len(count))
    assert calls == [1, 2]  # the checkpointed block ran again in backward
    assert all(g is not None for g in grads[1].values()) and any("lora_A" in n for n in grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_same_seed_same_run_with_dropout():
    def run(seed):
        seed_everything(seed)
        from transformers import BertConfig, BertForSequenceClassification

        model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=32, num_labels=3, hidden_dropout_prob=0.3))
        optimizer = build_optimizer(apply_strategy(model, "full", lr=1e-3).param_groups())
        losses = []
        train_epoch(model, token_batches(3), optimizer, progress=False, on_step=lambda s, loss, t: losses.append(loss))
        return losses

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_divergence_is_reported():
    model = tiny_bert()
    optimizer = _sgd(model)
    nan_loss = lambda m, b: m(**b.inputs).logits.sum() * float("nan")  # noqa: E731
    with pytest.raises(DivergenceError, match="the training loss became nan at micro-batch 0.*lower the learning rate"):
        train_epoch(model, token_batches(1), optimizer, loss_fn=nan_loss, progress=False)
    with pytest.raises(peftcore.PeftcoreError, match="gradient accumulation must be >= 1"):
        train_epoch(model, token_batches(1), optimizer, accumulation=0, progress=False)
