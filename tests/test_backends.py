"""Kernel backends seen from the public API: wrap(..., backend=...), PEFTCORE_BACKEND,
peftcore.backends() and the `peftcore backends` command, on whole wrapped models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import models
import peftcore
from peftcore.errors import BackendUnavailableError, ConfigError
from peftcore.ops import _extension, dispatch, lora_cpp

HAS_CPP = _extension.load()[0]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("PEFTCORE_BACKEND", raising=False)
    dispatch.refresh()
    yield
    dispatch.refresh()


def _randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _train_step(model, inputs, seed):
    torch.manual_seed(seed)  # fixes the dropout seeds the layers draw
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@needs_cpp
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cpp_and_reference_agree_on_a_training_step(family):
    """GPT-2 exercises Conv1D's transposed weight view; dropout 0.2 exercises mask regeneration."""
    make, make_inputs = models.FAMILIES[family]
    runs = {}
    for backend in ("reference", "cpp"):
        model = make()
        peftcore.wrap(model, "lora", rank=4, dropout=0.2, backend=backend)
        _randomise_lora(model)
        model.train()
        runs[backend] = _train_step(model, make_inputs(), seed=3)
    (loss_ref, grads_ref), (loss_cpp, grads_cpp) = runs["reference"], runs["cpp"]
    torch.testing.assert_close(loss_cpp, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_cpp.keys() == grads_ref.keys() and grads_ref
    for name in grads_ref:
        torch.testing.assert_close(grads_cpp[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_cpp
def test_env_var_switches_a_wrapped_model_to_reference(monkeypatch):
    model = models.gpt2()
    peftcore.wrap(model, "lora", rank=4)
    _randomise_lora(model)
    inputs = models.token_inputs()
    calls = []
    original = lora_cpp.cpp_lora_linear
    monkeypatch.setattr(lora_cpp, "cpp_lora_linear", lambda *a: calls.append(1) or original(*a))
    cpp_out = models.output_of(model, inputs)
    assert calls, "auto on the CPU should run the C++ op"
    calls.clear()
    monkeypatch.setenv("PEFTCORE_BACKEND", "reference")
    ref_out = models.output_of(model, inputs)
    assert not calls
    torch.testing.assert_close(cpp_out, ref_out, rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_rejected_at_wrap_and_leaves_the_model_alone():
    model = models.gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="lora backend 'fast' does not exist; choose 'auto' or one of .*reference"):
        peftcore.wrap(model, "lora", rank=4, backend="fast")
    assert not any("lora" in name for name, _ in model.named_modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_named_unavailable_backend_raises_at_forward():
    model = models.gpt2()
    peftcore.wrap(model, "lora", rank=4, backend="cpp")
    if HAS_CPP:
        models.output_of(model, models.token_inputs())  # fine on the CPU
    peftcore.register_kernel(_Unavailable())
    try:
        model2 = models.gpt2()
        peftcore.wrap(model2, "lora", rank=4, backend="offline")
        with pytest.raises(BackendUnavailableError, match="'offline' backend of lora_linear is unavailable: "
                                                           "no accelerator"):
            models.output_of(model2, models.token_inputs())
    finally:
        peftcore.registry.KERNELS.unregister("lora_linear.offline")


class _Unavailable:
    op, backend, devices, priority, hint, peftcore_api = "lora_linear", "offline", ("cpu",), -1, "", 1

    def available(self):
        return False, "no accelerator"

    def __call__(self, *args):
        raise AssertionError("must not run")


def test_backends_lists_every_lora_backend_with_its_state():
    table = peftcore.backends()
    rows = {(s.op, s.backend): s for s in table}
    assert rows[("lora_linear", "reference")].available
    assert rows[("lora_linear", "cpp")].available == HAS_CPP
    if not HAS_CPP:
        assert "not built" in rows[("lora_linear", "cpp")].reason


def test_backends_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "peftcore", "backends"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    lines = [line for line in out.splitlines() if line.startswith("lora_linear")]
    assert any(" reference " in line and "available" in line for line in lines)
    assert any(" cpp " in line for line in lines)
