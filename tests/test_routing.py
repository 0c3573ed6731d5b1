"""Per-example routing: ``model(..., adapter_names=...)``, ``peftcore.route``, ``generate``; each
example gets exactly what its adapter alone gives, errors before anything runs, and multi-tenant
training (each adapter learns from its own rows only)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftcore
from peftcore.errors import AdapterNotFoundError, AdapterStateError, ConfigError
from peftcore.routing import BASE
from peftcore.testing import check_routing
from models import gpt2, mlp, perturb, token_inputs


def _two_adapters(model, **b_options):
    """Adapters a (rank 4) and b (rank 2, rsLoRA, another alpha), both with non-zero deltas."""
    peftcore.wrap(model, "lora", name="a", rank=4, alpha=8)
    peftcore.wrap(model, "lora", name="b", rank=2, alpha=3, rslora=True, **b_options)
    for name, p in model.named_parameters():
        if ".lora_B." in name or ".lora_A." in name:
            with torch.no_grad():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(hash(name) % 1000)))
    return model


def _alone(model, name, inputs):
    if name == BASE:
        with peftcore.disabled(model), torch.no_grad():
            return model(**inputs).logits
    peftcore.activate(model, name)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_each_example_gets_its_adapter(backend, monkeypatch):
    monkeypatch.setenv("PEFTCORE_BACKEND", f"lora_grouped={backend}")
    peftcore.ops.dispatch.refresh()
    try:
        model = _two_adapters(gpt2())
        inputs = token_inputs(batch=4)
        names = ["a", "b", BASE, "a"]
        with torch.no_grad():
            routed = model(**inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            want = _alone(model, name, inputs)[i]
            torch.testing.assert_close(routed[i], want, rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.delenv("PEFTCORE_BACKEND")
        peftcore.ops.dispatch.refresh()


def test_context_manager_equals_keyword_and_leaves_nothing_behind():
    model = _two_adapters(gpt2())
    inputs = token_inputs(batch=3)
    with torch.no_grad():
        by_kwarg = model(**inputs, adapter_names=["b", "a", "b"]).logits
        with peftcore.route(model, ["b", "a", "b"]) as routing:
            by_context = model(**inputs).logits
        assert routing.used
        after = model(**inputs).logits  # the active adapter (b) on the whole batch again
    torch.testing.assert_close(by_kwarg, by_context, rtol=0, atol=0)
    torch.testing.assert_close(after, _alone(model, "b", inputs))
    assert all(m.routing is None for m in model.modules() if hasattr(m, "supports_routing"))


def test_embedding_conv_and_linear_layers_route():
    model = mlp()
    peftcore.wrap(model, "lora", name="a", rank=2, targets=["embed", "conv", "fc1"])
    peftcore.wrap(model, "lora", name="b", rank=3, targets=["embed", "fc1", "fc2"])
    perturb(model, scale=0.2)
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        routed = model(ids, adapter_names=["b", BASE, "a"])
        for i, name in enumerate(["b", BASE, "a"]):
            if name == BASE:
                with peftcore.disabled(model):
                    want = model(ids)
            else:
                peftcore.activate(model, name)
                want = model(ids)
            torch.testing.assert_close(routed[i], want[i], rtol=1e-5, atol=1e-6)


def test_generate_routes_each_prompt():
    model = _two_adapters(gpt2())
    ids = torch.randint(1, 128, (3, 4), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    routed = model.generate(ids, adapter_names=["a", BASE, "b"], **kwargs)
    for i, name in enumerate(["a", BASE, "b"]):
        if name == BASE:
            with peftcore.disabled(model):
                want = model.generate(ids, **kwargs)
        else:
            peftcore.activate(model, name)
            want = model.generate(ids, **kwargs)
        assert torch.equal(routed[i], want[i])
    beams = model.generate(ids, adapter_names=["a", BASE, "b"], num_beams=2, num_return_sequences=2, **kwargs)
    assert beams.shape[0] == 6  # each name stands for its prompt's beams


def test_errors_before_anything_runs():
    model = _two_adapters(gpt2())
    inputs = token_inputs(batch=2)
    with pytest.raises(ConfigError, match="2 examples"):
        model(**inputs, adapter_names=["a", "b", "a"])
    with pytest.raises(AdapterNotFoundError, match="'c'"):
        model(**inputs, adapter_names=["a", "c"])
    with pytest.raises(ConfigError, match="one adapter name per example"):
        model(**inputs, adapter_names="a")
    with pytest.raises(ConfigError, match="one adapter name per example"):
        model(**inputs, adapter_names=[])
    with pytest.raises(AdapterStateError, match="disabled"), peftcore.disabled(model):
        model(**inputs, adapter_names=["a", "b"])
    peftcore.merge(model, "b")
    with pytest.raises(AdapterStateError, match="merged"):
        model(**inputs, adapter_names=["a", "b"])
    peftcore.unmerge(model)
    # After the refusals the model routes as before (no routing left on any layer).
    assert all(m.routing is None for m in model.modules() if hasattr(m, "supports_routing"))
    model(**inputs, adapter_names=["a", "b"])


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def test_unused_adapter_names_is_an_error():
    model = _TwoBranches()
    peftcore.wrap(model, "lora", targets=["unused"], rank=2)
    with pytest.raises(ConfigError, match="was not used"):
        model(torch.randn(2, 4), adapter_names=["default", BASE])
    with pytest.raises(ConfigError, match="was not used"), peftcore.route(model, ["default", BASE]):
        model(torch.randn(2, 4))
    model(torch.randn(2, 4))  # and the model still runs afterwards


def test_methods_that_cannot_route_are_refused():
    model = gpt2()
    peftcore.wrap(model, "lora", name="a", rank=2)
    peftcore.wrap(model, "prefix", name="p", virtual_tokens=2)
    inputs = token_inputs(batch=2)
    with pytest.raises(ConfigError, match="'p' uses 'prefix'"):
        model(**inputs, adapter_names=["a", "p"])
    with pytest.raises(ConfigError, match="'p' .* is active"):
        model(**inputs, adapter_names=["a", "a"])
    peftcore.activate(model, "a")
    model(**inputs, adapter_names=["a", BASE])


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_bottleneck_adapters_route_beside_lora(placement):
    """Each example gets its own bottleneck adapter (or LoRA adapter, or none), in every placement:
    forward and mixed-batch gradients (the kit's check_routing)."""
    model = gpt2()
    peftcore.wrap(model, "lora", name="a", rank=2, targets=["c_attn"])
    peftcore.wrap(model, "adapter", name="bn", size=4, placement=placement)
    peftcore.wrap(model, "adapter", name="bn2", size=8, placement=placement)
    perturb(model, scale=0.3)  # every adapter away from the identity (and the base moved alike)
    inputs = token_inputs(batch=4)
    # float64: the mixed batch and the single examples round differently in float32 (~1e-4 here)
    check_routing(model.double(), inputs, ["bn2", "a", BASE, "bn"], rtol=1e-9, atol=1e-9, grad_rtol=1e-9, grad_atol=1e-9)
    with torch.no_grad():
        got = model(**inputs, adapter_names=["bn2", "bn", "bn2", "bn"]).logits
    assert (got[0] - got[1]).abs().max() > 1e-3  # two different adapters, two different outputs


def test_unwrap_removes_the_keyword():
    model = _two_adapters(gpt2())
    peftcore.unwrap(model)
    assert "generate" not in model.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_deepcopy_routes_the_copy():
    model = _two_adapters(gpt2())
    clone = copy.deepcopy(model)
    inputs = token_inputs(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs, adapter_names=["b", "a"]).logits, model(**inputs, adapter_names=["b", "a"]).logits)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_mixed_batch_trains_each_adapter_from_its_own_rows(backend, monkeypatch):
    """Training a and b on one mixed batch equals training each alone on its rows; c (absent)
    gets no gradient."""
    monkeypatch.setenv("PEFTCORE_BACKEND", f"lora_grouped={backend}")
    peftcore.ops.dispatch.refresh()
    try:
        base = gpt2()
        peftcore.wrap(base, "lora", name="a", rank=4, alpha=8)
        peftcore.wrap(base, "lora", name="b", rank=2, alpha=3, rslora=True)
        peftcore.wrap(base, "lora", name="c", rank=2)
        base.train()
        inputs = token_inputs(batch=4)
        names = ["a", "b", "b", "a"]

        def step(model, rows, adapter_names=None, active=None):
            params = [p for n, p in model.named_parameters() if ".lora_" in n]
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            if active is not None:
                peftcore.activate(model, active)
            batch = {k: v[rows] for k, v in inputs.items()}
            kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
            out = model(**batch, **kwargs)
            # Sum of per-example losses (the mean of each example's tokens): independent of the batch.
            logits = out.logits[:, :-1]
            per_token = nn.functional.cross_entropy(logits.reshape(-1, 128), batch["input_ids"][:, 1:].reshape(-1), reduction="none")
            per_token.reshape(len(rows), -1).mean(1).sum().backward()
            return {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}

        mixed = step(copy.deepcopy(base), [0, 1, 2, 3], names)
        only_a = step(copy.deepcopy(base), [0, 3], active="a")
        only_b = step(copy.deepcopy(base), [1, 2], active="b")
        for name, grad in mixed.items():
            adapter = name.rsplit(".", 1)[1]  # ...c_attn.lora_A.<adapter>
            if adapter == "c":
                assert grad is None, name  # c had no row: no gradient at all
                continue
            want = (only_a if adapter == "a" else only_b)[name]
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    finally:
        monkeypatch.delenv("PEFTCORE_BACKEND")
        peftcore.ops.dispatch.refresh()


@pytest.mark.slow
def test_routing_under_torch_compile_equals_eager_and_follows_each_calls_names():
    """A compiled model serves routed batches: each call's adapter_names decide its rows (no stale
    routing baked into the graph), and the outputs equal the eager model's."""
    model = _two_adapters(gpt2())
    inputs = token_inputs(batch=3)
    compiled = torch.compile(model)
    for names in (["a", "b", BASE], ["b", "a", "a"], [BASE, BASE, "b"]):
        with torch.no_grad():
            eager = model(**inputs, adapter_names=names).logits
            got = compiled(**inputs, adapter_names=names).logits
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        for row, name in enumerate(names):
            alone = _alone(model, name, {k: v[row:row + 1] for k, v in inputs.items()})
            torch.testing.assert_close(got[row:row + 1], alone, rtol=1e-5, atol=1e-5)
