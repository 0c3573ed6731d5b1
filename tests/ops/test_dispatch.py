"""Backend dispatch of lora_linear: auto, PEFTCORE_BACKEND (plain and per op), named backends,
fallback warning, per-layer kernel caches."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftcore
from peftcore.errors import BackendUnavailableError, ConfigError
from peftcore.ops import _extension, bottleneck, bottleneck_cpp, dispatch, lora, lora_cpp

HAS_CPP = _extension.load()[0]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")


class _Probe:
    """A kernel that records calls; its availability is set by the test."""

    op = "lora_linear"
    devices = ("cpu",)
    hint = "Install the probe to get it."
    peftcore_api = 1

    def __init__(self, backend: str, priority: int, ok: bool, reason: str = "probe switched off"):
        self.backend, self.priority, self.ok, self.reason = backend, priority, ok, reason
        self.calls = 0

    def available(self):
        return self.ok, "" if self.ok else self.reason

    def __call__(self, *args):
        self.calls += 1
        return lora.reference_lora_linear(*args)


@pytest.fixture(autouse=True)
def _fresh_dispatch(monkeypatch):
    monkeypatch.delenv("PEFTCORE_BACKEND", raising=False)
    dispatch.refresh()
    yield
    for name in ("lora_linear.probe", "lora_linear.broken"):
        peftcore.registry.KERNELS.unregister(name)
    dispatch.refresh()


def _args():
    return torch.randn(3, 4), torch.randn(2, 4), None, torch.randn(1, 4), torch.randn(2, 1), 1.0


@needs_cpp
def test_auto_picks_cpp_on_cpu():
    assert dispatch.select("lora_linear", "cpu") is lora_cpp.CPP


def test_env_var_chooses_the_backend(monkeypatch):
    monkeypatch.setenv("PEFTCORE_BACKEND", "reference")
    assert dispatch.select("lora_linear", "cpu") is lora.REFERENCE
    assert dispatch.select("lora_linear", "cpu", "auto") is lora.REFERENCE


@needs_cpp
def test_named_backend_wins_over_env_var(monkeypatch):
    monkeypatch.setenv("PEFTCORE_BACKEND", "reference")
    assert dispatch.select("lora_linear", "cpu", "cpp") is lora_cpp.CPP


def test_unknown_backend_raises_with_the_known_ones():
    with pytest.raises(BackendUnavailableError, match=r"no backend 'nope' for lora_linear; known: .*reference"):
        lora.lora_linear(*_args(), backend="nope")


def test_named_unavailable_backend_raises_with_reason_and_hint():
    peftcore.register_kernel(_Probe("probe", 99, ok=False, reason="the probe library is missing"))
    with pytest.raises(BackendUnavailableError, match="'probe' backend of lora_linear is unavailable: the probe "
                                                       "library is missing. Install the probe"):
        lora.lora_linear(*_args(), backend="probe")


def test_backend_for_another_device_raises():
    with pytest.raises(BackendUnavailableError, match="runs on cpu, not on cuda"):
        dispatch.select("lora_linear", "cuda", "cpp")


def test_auto_falls_back_and_warns_once():
    probe = _Probe("probe", 99, ok=False)
    peftcore.register_kernel(probe)
    with pytest.warns(RuntimeWarning, match="runs on the '.*' backend because 'probe' is unavailable "
                                            r"\(probe switched off\). Install the probe"):
        lora.lora_linear(*_args())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            lora.lora_linear(*_args())
    assert probe.calls == 0


def test_auto_takes_the_highest_priority_available_kernel():
    probe = _Probe("probe", 99, ok=True)
    peftcore.register_kernel(probe)
    y = lora.lora_linear(*_args())
    assert probe.calls == 1 and y.shape == (3, 2)


def test_a_crashing_availability_probe_means_unavailable():
    class Broken(_Probe):
        def available(self):
            raise OSError("driver exploded")

    peftcore.register_kernel(Broken("broken", 98, ok=True))
    status = {s.backend: s for s in peftcore.backends("lora_linear")}
    assert not status["broken"].available and "OSError: driver exploded" in status["broken"].reason


def test_backends_report():
    table = peftcore.backends("lora_linear")
    status = {s.backend: s for s in table}
    assert status["reference"].available and status["reference"].reason == ""
    assert status["cpp"].available == HAS_CPP
    assert status["cpp"].devices == ("cpu",)
    assert "lora_linear" in str(table) and "cpp" in str(table)


def test_cpp_unavailable_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "load", lambda: (False, "the C++ extension peftcore._C is not built (test)"))
    ok, reason = lora_cpp.CPP.available()
    assert not ok and "not built" in reason
    assert "pip install --no-build-isolation -e ." in lora_cpp.CPP.hint
    with pytest.warns(RuntimeWarning, match="'cpp' is unavailable .*not built.*pip install --no-build-isolation"):
        kernel = dispatch.select("lora_linear", "cpu")
    assert kernel is lora.REFERENCE


def test_flattened_leading_dims_round_trip():
    x = torch.randn(2, 3, 5, 4)
    W, A, B = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    y = lora.lora_linear(x, W, None, A, B, 1.0, backend="reference")
    assert y.shape == (2, 3, 5, 6)
    torch.testing.assert_close(y, lora.reference_lora_linear(x, W, None, A, B, 1.0))


def test_int_and_tensor_seeds_give_the_same_mask():
    x, W, A, B = torch.randn(5, 8), torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 2)
    a = lora.lora_linear(x, W, None, A, B, 1.0, 0.5, 77, backend="reference")
    b = lora.lora_linear(x, W, None, A, B, 1.0, 0.5, torch.tensor(77), backend="reference")
    assert torch.equal(a, b)
    if HAS_CPP:
        c = lora.lora_linear(x, W, None, A, B, 1.0, 0.5, 77, backend="cpp")
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


# -- PEFTCORE_BACKEND: plain and per-op forms, read once until refresh() -----------------------------
def _bottleneck_args():
    return torch.randn(3, 4), torch.randn(2, 4), None, torch.randn(4, 2), None, 1.0


@needs_cpp
def test_env_var_per_op_form(monkeypatch):
    monkeypatch.setenv("PEFTCORE_BACKEND", "lora_linear=reference, bottleneck=cpp")
    assert dispatch.select("lora_linear", "cpu") is lora.REFERENCE
    assert dispatch.select("bottleneck", "cpu") is bottleneck_cpp.CPP


@needs_cpp
def test_env_var_per_op_entry_wins_over_the_plain_one(monkeypatch):
    monkeypatch.setenv("PEFTCORE_BACKEND", "reference,bottleneck=cpp")
    assert dispatch.select("lora_linear", "cpu") is lora.REFERENCE
    assert dispatch.select("bottleneck", "cpu") is bottleneck_cpp.CPP
    assert dispatch.select("bottleneck", "cpu", "reference") is bottleneck.REFERENCE  # named in code wins


def test_plain_env_backend_that_an_op_lacks_falls_back_to_auto_with_one_warning(monkeypatch):
    probe = _Probe("probe", -5, ok=True)  # a lora_linear backend only; auto would not pick it
    peftcore.register_kernel(probe)
    monkeypatch.setenv("PEFTCORE_BACKEND", "probe")
    lora.lora_linear(*_args())
    assert probe.calls == 1
    with pytest.warns(RuntimeWarning, match="PEFTCORE_BACKEND asks for 'probe', which bottleneck does not have "
                                            r"\(its backends: .*reference.*\), so bottleneck runs on 'auto'"):
        y = bottleneck.bottleneck(*_bottleneck_args())
    assert y.shape == (3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bottleneck.bottleneck(*_bottleneck_args())


def test_per_op_env_backend_that_the_op_lacks_is_an_error(monkeypatch):
    monkeypatch.setenv("PEFTCORE_BACKEND", "bottleneck=probe")
    with pytest.raises(BackendUnavailableError, match="no backend 'probe' for bottleneck; known: .*reference"):
        bottleneck.bottleneck(*_bottleneck_args())


@pytest.mark.parametrize("value, message", [
    ("lora=cpp", r"no op named 'lora'; the ops are bottleneck, (.*, )?lora_linear"),
    ("lora_linear=", r"cannot read 'lora_linear='"),
    ("cpp,reference", r"the backend for every op is given twice"),
    ("lora_linear=cpp,lora_linear=reference", r"'lora_linear' is given twice"),
])
def test_malformed_env_var_is_a_config_error(monkeypatch, value, message):
    monkeypatch.setenv("PEFTCORE_BACKEND", value)
    with pytest.raises(ConfigError, match=rf"PEFTCORE_BACKEND='{value}': {message}\. Write one backend"):
        dispatch.select("lora_linear", "cpu")


def test_env_var_is_read_once_until_refresh(monkeypatch):
    before = dispatch.select("lora_linear", "cpu")  # reads PEFTCORE_BACKEND: unset, so auto
    peftcore.register_kernel(_Probe("probe", -5, ok=True))  # auto would not pick it
    monkeypatch.setenv("PEFTCORE_BACKEND", "probe")
    assert dispatch.select("lora_linear", "cpu") is before  # not read again
    dispatch.refresh()
    assert dispatch.select("lora_linear", "cpu").backend == "probe"


# -- per-layer kernel caches ----------------------------------------------------------------------------
def test_kernel_cache_resolves_once_per_backend_device_and_dtype(monkeypatch):
    cache = dispatch.KernelCache("lora_linear")
    calls = []
    original = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda *a: calls.append(a) or original(*a))
    for _ in range(3):
        assert cache("reference", "cpu", torch.float32) is lora.REFERENCE
        cache("reference", "cpu", torch.float64)
    assert calls == [("lora_linear", "cpu", "reference")] * 2


def test_kernel_cache_follows_refresh_and_registrations():
    cache = dispatch.KernelCache("lora_linear")
    first = cache("auto", "cpu", torch.float32)
    probe = _Probe("probe", 99, ok=True)
    peftcore.register_kernel(probe)  # the registry changes: resolved again
    assert cache("auto", "cpu", torch.float32) is probe
    peftcore.registry.KERNELS.unregister("lora_linear.probe")
    assert cache("auto", "cpu", torch.float32) is first


def test_kernel_cache_copies_start_empty():
    import copy
    import pickle

    cache = dispatch.KernelCache("lora_linear")
    cache("reference", "cpu", torch.float32)
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert clone.op == "lora_linear" and clone._kernels == {}
        assert clone("reference", "cpu", torch.float32) is lora.REFERENCE

