"""torch.compile of models wrapped with the cpp backend: no graph breaks, no recompiles as the
dropout seed changes, and the same numbers as eager (inference, and a training step with dropout)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
import peftcore
from peftcore.ops import _extension

pytestmark = pytest.mark.skipif(not _extension.load()[0], reason="C++ extension not built")


def _model(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8))
    peftcore.wrap(model, "lora", rank=4, dropout=dropout, backend="cpp")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _step(model, x, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("training", [False, True])
def test_no_graph_breaks(training):
    model = _model(0.1).train(training)
    explanation = torch._dynamo.explain(model)(torch.randn(5, 24))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_training_step_matches_eager_without_recompiles():
    # aot_eager runs the traced forward and backward graphs with eager kernels, so torch's RNG
    # draws the same seeds as in eager mode: losses and gradients must agree.
    torch._dynamo.reset()
    model = _model(0.1).train()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 7, 24)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (3, 4, 5):  # a new dropout seed per step, one compiled graph
            loss_eager, grads_eager = _step(model, x, seed)
            loss_compiled, grads_compiled = _step(compiled, x, seed)
            torch.testing.assert_close(loss_compiled, loss_eager)
            for got, want in zip(grads_compiled, grads_eager):
                torch.testing.assert_close(got, want)
    assert not torch.equal(_step(model, x, 3)[0], _step(model, x, 4)[0])  # dropout did change


def test_inductor_inference_matches_eager():
    torch._dynamo.reset()
    model = _model(0.1).eval()
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_training_of_a_transformer():
    torch._dynamo.reset()
    model = models.gpt2()
    peftcore.wrap(model, "lora", rank=4, dropout=0.1, backend="cpp")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    compiled = torch.compile(model)
    inputs = models.token_inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            optimizer.zero_grad(set_to_none=True)
            loss = compiled(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
