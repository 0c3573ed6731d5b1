"""Kernel backends seen from the public API: wrap(..., backend=...), PEFTCORE_BACKEND,
peftcore.backends() and the `peftcore backends` command, on whole wrapped models."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import models
import peftcore
from peftcore import plugin
from peftcore.errors import BackendUnavailableError, ConfigError, PluginError
from peftcore.ops import _extension, dispatch, lora, lora_cpp

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
def test_env_var_switches_a_wrapped_model_to_reference_after_refresh(monkeypatch):
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
    models.output_of(model, inputs)
    assert calls, "layers keep the kernel they resolved until dispatch.refresh()"
    calls.clear()
    dispatch.refresh()
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


# -- kernels resolved once per layer --------------------------------------------------------------
def test_wrapped_layers_do_not_dispatch_at_each_forward(monkeypatch):
    """Layers resolve the kernel at wrap (and per new device type/dtype), not in every forward."""
    calls = []
    original = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda *a, **k: calls.append(a) or original(*a, **k))
    for model in _lora_and_adapter_models():
        calls.clear()
        for _ in range(3):
            model(torch.randn(4, 6))
        assert calls == []
        model.double()(torch.randn(4, 6, dtype=torch.float64))  # a new dtype: resolved once more
        model(torch.randn(4, 6, dtype=torch.float64))
        assert len(calls) == 1


def _lora_and_adapter_models():
    """Two small models: one with LoRA on its first layer, one with a bottleneck adapter on its last."""
    models = []
    for method, target, options in (("lora", "0", {"rank": 2}), ("adapter", "2", {"size": 2})):
        model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
        peftcore.wrap(model, method, targets=[target], **options)
        models.append(model)
    return models


# -- PEFTCORE_BACKEND for one op only -----------------------------------------------------------------
class _LoraOnly:
    """A backend that only lora_linear has (as a GPU-only or plugin backend may be)."""

    op, backend, devices, priority, hint, peftcore_api = "lora_linear", "loraonly", ("cpu",), -5, "", 1

    def __init__(self):
        self.calls = 0

    def available(self):
        return True, ""

    def __call__(self, *args):
        self.calls += 1
        return lora.reference_lora_linear(*args)


@pytest.fixture
def lora_only():
    kernel = peftcore.register_kernel(_LoraOnly())
    yield kernel
    peftcore.registry.KERNELS.unregister("lora_linear.loraonly")


def test_plain_env_backend_of_one_op_leaves_the_adapter_method_working(monkeypatch, lora_only):
    monkeypatch.setenv("PEFTCORE_BACKEND", "loraonly")
    with pytest.warns(RuntimeWarning, match="PEFTCORE_BACKEND asks for 'loraonly', which bottleneck does not have"):
        models = _lora_and_adapter_models()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        outputs = [model(torch.randn(4, 6)) for model in models]
    assert [out.shape for out in outputs] == [(4, 3)] * 2 and lora_only.calls == 1


def test_per_op_env_form_chooses_for_one_op(monkeypatch, lora_only):
    monkeypatch.setenv("PEFTCORE_BACKEND", "lora_linear=loraonly")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in _lora_and_adapter_models():
            model(torch.randn(4, 6))
    assert lora_only.calls == 1


# -- a kernel plugin that fails to import --------------------------------------------------------------
BROKEN_KERNEL = """raise ImportError("libfastk.so.2: cannot open shared object file")
"""


@pytest.fixture
def broken_kernel_plugin(tmp_path, monkeypatch):
    """Distribution peftcore-fastk 0.3 declares lora_linear.fastk and bottleneck.fastk, whose module fails to import."""
    site = tmp_path / "site-packages"
    dist_info = site / "peftcore_fastk-0.3.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: peftcore-fastk\nVersion: 0.3\n")
    (dist_info / "entry_points.txt").write_text(
        "[peftcore.kernels]\nlora_linear.fastk = peftcore_fastk:LORA\nbottleneck.fastk = peftcore_fastk:BOTTLENECK\n")
    (site / "peftcore_fastk.py").write_text(BROKEN_KERNEL)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("PEFTCORE_DISABLE_PLUGINS", raising=False)
    plugin.refresh()
    yield
    sys.modules.pop("peftcore_fastk", None)
    plugin.refresh()


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_backend_from_a_broken_plugin_names_its_distribution_at_wrap(broken_kernel_plugin, method):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped entry's own warning
        with pytest.raises(PluginError, match=r"'(lora_linear|bottleneck)\.fastk' from distribution peftcore-fastk 0\.3 "
                                              r"failed to import.*libfastk") as info:
            peftcore.wrap(model, method, targets=["0"], backend="fastk")
    assert isinstance(info.value.__cause__, ImportError)
    assert not any("lora" in name or "bottleneck" in name for name, _ in model.named_modules())


def test_broken_plugin_backend_called_directly_raises_its_plugin_error(broken_kernel_plugin, monkeypatch):
    args = torch.randn(3, 4), torch.randn(2, 4), None, torch.randn(1, 4), torch.randn(2, 1), 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(PluginError, match="distribution peftcore-fastk 0.3 failed to import"):
            lora.lora_linear(*args, backend="fastk")
        monkeypatch.setenv("PEFTCORE_BACKEND", "fastk")  # a broken plugin is not silently replaced by auto
        dispatch.refresh()
        with pytest.raises(PluginError, match="distribution peftcore-fastk 0.3 failed to import"):
            lora.lora_linear(*args)

