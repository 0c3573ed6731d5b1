"""Backend dispatch of lora_linear: auto, PEFTCORE_BACKEND, named backends, fallback warning."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftcore
from peftcore.errors import BackendUnavailableError
from peftcore.ops import _extension, dispatch, lora, lora_cpp

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
