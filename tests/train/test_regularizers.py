"""L1 and EWC penalties: values and gradients against closed forms; the Fisher diagonal against
per-example gradients of a softmax regression; EWC limits forgetting in training."""

import copy

import pytest
import torch
from torch import nn

from peftcore.errors import ConfigError
from peftcore.train import EWC, L1Penalty, apply_strategy, build_optimizer, fisher_diagonal, train_epoch
from peftcore.train.data import Batch
from peftcore.train.regularizers import combine
from train_models import tiny_bert, token_batches

pytestmark = pytest.mark.usefixtures("single_thread")


def _softmax_regression_data(seed=0, n_batches=3, batch=5):
    g = torch.Generator().manual_seed(seed)
    return [Batch({"x": torch.randn(batch, 4, generator=g)}, torch.randint(0, 3, (batch,), generator=g)) for _ in range(n_batches)]


def _linear_loss(model, batch):
    return nn.functional.cross_entropy(model(batch.inputs["x"]), batch.labels)


def test_fisher_matches_the_closed_form_of_softmax_regression():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = _softmax_regression_data()
    fisher = fisher_diagonal(model, batches, list(model.named_parameters()), loss_fn=_linear_loss, max_examples=None)
    # per example: dL/dW = (softmax(Wx + b) - onehot(y)) x^T, dL/db = softmax - onehot
    x = torch.cat([b.inputs["x"] for b in batches])
    y = torch.cat([b.labels for b in batches])
    with torch.no_grad():
        residual = torch.softmax(model(x), dim=-1) - nn.functional.one_hot(y, 3).float()  # (N, 3)
    expected_w = (residual[:, :, None] * x[:, None, :]).square().mean(0)  # (3, 4)
    expected_b = residual.square().mean(0)
    torch.testing.assert_close(fisher["weight"], expected_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher["bias"], expected_b, rtol=1e-5, atol=1e-7)


def test_fisher_limits_examples_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    model.weight.requires_grad_(False)
    model.train()
    batches = _softmax_regression_data()
    first_batch_only = fisher_diagonal(model, batches[:1], list(model.named_parameters()), loss_fn=_linear_loss, max_examples=None)
    limited = fisher_diagonal(model, batches, list(model.named_parameters()), loss_fn=_linear_loss, max_examples=5)
    torch.testing.assert_close(limited["weight"], first_batch_only["weight"])
    assert not model.weight.requires_grad and model.bias.requires_grad and model.training
    assert model.weight.grad is None and model.bias.grad is None


def test_ewc_is_zero_at_the_reference_and_quadratic_away_from_it():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    params = list(model.named_parameters())
    fisher = {"weight": torch.rand(3, 4), "bias": torch.rand(3)}
    ewc = EWC(params, fisher, strength=10.0)
    assert ewc().item() == 0.0
    delta_w, delta_b = torch.randn(3, 4), torch.randn(3)
    with torch.no_grad():
        model.weight += delta_w
        model.bias += delta_b
    value = ewc()
    expected = 0.5 * 10.0 * ((fisher["weight"] * delta_w ** 2).sum() + (fisher["bias"] * delta_b ** 2).sum())
    torch.testing.assert_close(value, expected)
    value.backward()
    torch.testing.assert_close(model.weight.grad, 10.0 * fisher["weight"] * delta_w)  # pulls back toward the reference
    # an explicit reference, and a larger strength, scale as they should
    ewc2 = EWC(params, fisher, strength=20.0, reference={"weight": model.weight.detach() - delta_w, "bias": model.bias.detach() - delta_b})
    torch.testing.assert_close(ewc2(), 2 * expected)


def test_l1_value_and_gradient_skip_vectors_and_frozen_parameters():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(2, 2)
    b.weight.requires_grad_(False)
    penalty = L1Penalty(list(a.parameters()) + list(b.parameters()), strength=0.5)
    value = penalty()
    torch.testing.assert_close(value, 0.5 * a.weight.abs().sum())
    value.backward()
    torch.testing.assert_close(a.weight.grad, 0.5 * torch.sign(a.weight))
    assert a.bias.grad is None
    both = combine([penalty, penalty])
    torch.testing.assert_close(both(), 2 * value.detach())
    assert combine([]) is None


@pytest.mark.parametrize("make", [
    lambda m: L1Penalty(m.parameters(), 0.0),
    lambda m: EWC(list(m.named_parameters()), {}, 1.0),
    lambda m: EWC(list(m.named_parameters()), {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, -1.0),
])
def test_bad_penalties(make):
    with pytest.raises(ConfigError):
        make(nn.Linear(2, 2))


def _loss(model, batches):
    with torch.no_grad():
        return sum(nn.functional.cross_entropy(model(**b.inputs).logits, b.labels).item() for b in batches) / len(batches)


def test_ewc_limits_forgetting_of_the_reference_task():
    task_a = token_batches(4, seed=1)
    task_b = [Batch(b.inputs, (b.inputs["input_ids"][:, -1] + 1) % 3) for b in token_batches(4, seed=2)]
    model = tiny_bert(layers=2)
    plan = apply_strategy(model, "full", lr=3e-3, weight_decay=0.0)
    optimizer = build_optimizer(plan.param_groups())
    for _ in range(10):
        train_epoch(model, task_a, optimizer, progress=False)
    loss_a = _loss(model, task_a)

    def continue_on_b(strength):
        m = copy.deepcopy(model)
        p = apply_strategy(m, "full", lr=3e-3, weight_decay=0.0)
        penalty = EWC.from_data(m, task_a, p.named_parameters(), strength, max_examples=None) if strength else None
        opt = build_optimizer(p.param_groups())
        for _ in range(10):
            train_epoch(m, task_b, opt, progress=False, penalty=penalty)
        moved = sum((q - dict(model.named_parameters())[n]).square().sum().item() for n, q in m.named_parameters())
        return _loss(m, task_a), _loss(m, task_b), moved

    plain_a, plain_b, plain_moved = continue_on_b(0.0)
    ewc_a, ewc_b, ewc_moved = continue_on_b(300.0)
    assert plain_a > loss_a  # training on B alone forgets A
    assert ewc_a < plain_a and ewc_moved < plain_moved  # EWC holds the weights (and task A) closer
    assert ewc_b < _loss(model, task_b)  # ... while still learning B
