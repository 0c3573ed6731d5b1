"""Plugins through real distributions: lazy discovery, provider records, conflicts, broken plugins.

Each test puts throwaway distributions (``<name>-<version>.dist-info`` with ``METADATA`` and
``entry_points.txt``, beside their modules) in a temporary directory on ``sys.path``, exactly
what pip leaves in site-packages, and makes peftcore read the installed distributions again.
The main plugin is the complete example from docs/plugins.md, built from the page's blocks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import peftcore
from peftcore import plugin, registry
from peftcore.errors import BackendUnavailableError, CheckpointError, PluginError, UnsupportedModuleError
from peftcore.plugin import PluginConflictError
from peftcore.testing import tiny_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def make_distribution(site: Path, name: str, version: str, entry_points: dict[str, dict[str, str]],
                      files: dict[str, str] | None = None, metadata: str | None = None) -> Path:
    """Writes what pip installs for a distribution: its dist-info and its modules."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(metadata or f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    sections = []
    for group, entries in entry_points.items():
        sections.append(f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in entries.items()))
    (dist_info / "entry_points.txt").write_text("\n".join(sections))
    for rel, text in (files or {}).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    plugin.refresh()
    return dist_info


def docs_example() -> dict[str, str]:
    """The files of the docs' example plugin: ``<!-- example: path -->`` before a fenced block."""
    blocks = dict(re.findall(r"<!-- example: (\S+) -->\s*```[a-z]*\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S))
    assert {"pyproject.toml", "peftcore_shift.py", "tests/test_shift.py"} <= set(blocks), "docs/plugins.md lost its example"
    return blocks


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site-packages"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("PEFTCORE_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("PEFTCORE_PREFER", raising=False)
    plugin.refresh()
    yield root
    for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", "") or "").startswith(str(root))]:
        del sys.modules[name]
    plugin._preferences.clear()
    plugin.refresh()


@pytest.fixture
def shift(site):
    """The docs' example, installed: distribution peftcore-shift 0.1.0 providing method 'shift'."""
    blocks = docs_example()
    project = tomllib.loads(blocks["pyproject.toml"])["project"]
    make_distribution(site, project["name"], project["version"], project["entry-points"],
                      {"peftcore_shift.py": blocks["peftcore_shift.py"]})
    return project


def _bert_inputs():
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model):
    with torch.no_grad():
        return model(**_bert_inputs()).logits


def test_docs_example_pyproject_declares_the_groups(shift):
    assert shift["name"] == "peftcore-shift" and shift["dependencies"] == ["peftcore"]
    assert set(shift["entry-points"]) == {"peftcore.methods", "peftcore.layers"}


def test_import_and_listing_import_no_plugin_and_first_use_does(shift, site):
    code = textwrap.dedent("""
        import json, sys
        import peftcore
        catalog = peftcore.methods()
        before = sorted(m for m in sys.modules if m.startswith(("peftcore_", "peftcore.tuners")))
        import torch
        peftcore.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4)), "shift")
        print(json.dumps({"before": before, "shift": [catalog["shift"].distribution, catalog["shift"].version],
                          "names": sorted(catalog), "after": "peftcore_shift" in sys.modules}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("PEFTCORE_DISABLE_PLUGINS", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Nothing of any plugin (the example, the IA3/DoRA packages when installed, or even the
    # built-in LoRA) is imported by `import peftcore` and `peftcore.methods()`.
    assert result["before"] == []
    assert result["shift"] == ["peftcore-shift", "0.1.0"]
    assert {"lora", "shift"} <= set(result["names"])
    assert result["after"] is True


def test_docs_example_passes_its_own_test(shift):
    namespace: dict = {}
    exec(compile(docs_example()["tests/test_shift.py"], "tests/test_shift.py", "exec"), namespace)
    namespace["test_shift_passes_the_conformance_kit"]()


def test_saved_plugin_adapter_records_its_distribution_and_needs_it_to_load(shift, site, tmp_path, monkeypatch):
    model = peftcore.wrap(tiny_model("bert"), "shift")
    with torch.no_grad():
        for _, p in peftcore.registry.get_method("shift").adapter_parameters(model, "default"):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    expected = _logits(model)
    peftcore.save(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "shift"
    assert config["provider"] == {"distribution": "peftcore-shift", "version": "0.1.0"}

    fresh = tiny_model("bert")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    monkeypatch.setenv("PEFTCORE_DISABLE_PLUGINS", "1")
    with pytest.raises(CheckpointError, match=r"peftcore-shift 0\.1\.0.*PEFTCORE_DISABLE_PLUGINS.*pip install peftcore-shift"):
        peftcore.load(fresh, tmp_path / "adapter")
    monkeypatch.delenv("PEFTCORE_DISABLE_PLUGINS")

    sys.path.remove(str(site))  # uninstalled
    plugin.refresh()
    with pytest.raises(CheckpointError, match=r"which is not installed; install it \(pip install peftcore-shift\)") as info:
        peftcore.load(fresh, tmp_path / "adapter")
    assert "PEFTCORE_DISABLE_PLUGINS" not in str(info.value)
    assert isinstance(info.value.__cause__, PluginError)
    assert not peftcore.adapters(fresh) and list(fresh.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())

    sys.path.insert(0, str(site))  # installed again
    plugin.refresh()
    peftcore.load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=0)


def test_two_distributions_claiming_a_name_need_a_choice(shift, site):
    make_distribution(site, "peftcore-shift-fork", "2.0", {
        "peftcore.methods": {"shift": "peftcore_shift:ShiftMethod"},
        "peftcore.layers": {"shift.linear": "peftcore_shift:LINEAR"},
    })
    model = tiny_model("bert")
    with pytest.raises(PluginConflictError, match=r"method 'shift' .* claimed by .*peftcore-shift 0\.1\.0.*peftcore-shift-fork 2\.0"
                       r"|method 'shift' .* claimed by .*peftcore-shift-fork 2\.0.*peftcore-shift 0\.1\.0"):
        peftcore.wrap(model, "shift")
    assert not peftcore.adapters(model)
    info = peftcore.methods()["shift"]
    assert sorted(info.claimed_by) == ["peftcore-shift 0.1.0", "peftcore-shift-fork 2.0"]
    assert "conflict" in str(peftcore.methods())

    plugin.prefer("shift", "peftcore-shift-fork")
    # the layer handler name is claimed twice as well: a conflict of its own
    with pytest.raises(PluginConflictError, match="layer 'shift.linear'"):
        peftcore.wrap(model, "shift")
    plugin.prefer("shift.linear", "peftcore_shift_fork", group="peftcore.layers")  # names compare normalised
    peftcore.wrap(model, "shift")
    assert model._peftcore.adapters["default"].provider == {"distribution": "peftcore-shift-fork", "version": "2.0"}
    assert peftcore.methods()["shift"].distribution == "peftcore-shift-fork"

    plugin.prefer("shift", None)  # forget the choice: a conflict again
    with pytest.raises(PluginConflictError):
        registry.get_method("shift")


def test_prefer_environment_variable(shift, site, monkeypatch):
    make_distribution(site, "peftcore-shift-fork", "2.0", {"peftcore.methods": {"shift": "peftcore_shift:ShiftMethod"}})
    monkeypatch.setenv("PEFTCORE_PREFER", "shift=peftcore-shift")
    assert registry.method_provider("shift") == {"distribution": "peftcore-shift", "version": "0.1.0"}
    monkeypatch.setenv("PEFTCORE_PREFER", "shift=not-installed")
    plugin.refresh()
    with pytest.raises(PluginConflictError, match="preferred distribution 'not-installed'"):
        registry.get_method("shift")


LORA_FORK = """
from peftcore.tuners.lora.method import LoraMethod
from peftcore.tuners.lora.layers import LINEAR as _LINEAR
from peftcore.ops.lora import REFERENCE as _REFERENCE


class ForkMethod(LoraMethod):
    peftcore_api = 1
    forked = True


class _ForkKernel(type(_REFERENCE)):
    backend = "cpp"
    devices = ("cpu",)
    peftcore_api = 1


LINEAR = _LINEAR
KERNEL = _ForkKernel()
"""


def test_builtins_win_over_a_third_party_claim_with_a_warning_and_prefer_can_choose_it(site):
    make_distribution(site, "lora-fork", "1.0", {
        "peftcore.methods": {"lora": "lora_fork:ForkMethod"},
        "peftcore.layers": {"lora.linear": "lora_fork:LINEAR"},
        "peftcore.kernels": {"lora_linear.cpp": "lora_fork:KERNEL"},
    }, {"lora_fork.py": LORA_FORK})
    with pytest.warns(RuntimeWarning) as caught:
        method = registry.get_method("lora")  # resolves the method and its layer handlers
        assert registry.KERNELS.entry("lora_linear.cpp").distribution == "peftcore"
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3, messages
    for what, name in (("kernel", "lora_linear.cpp"), ("layer", "lora.linear"), ("method", "lora")):
        assert any(f"{what} {name!r} (entry-point group" in m and "also claimed by lora-fork 1.0; "
                   f"peftcore's own {name!r} is used" in m for m in messages), messages
    assert not getattr(method, "forked", False) and registry.method_provider("lora")["distribution"] == "peftcore"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved once: no second warning
        peftcore.wrap(nn.Sequential(nn.Linear(3, 3)), "lora")
    assert "lora-fork 1.0" in str(peftcore.methods())  # the listing shows the competing claim
    plugin.prefer("lora", "lora-fork")
    assert getattr(registry.get_method("lora"), "forked", False)
    assert registry.method_provider("lora") == {"distribution": "lora-fork", "version": "1.0"}


def test_two_third_parties_claiming_a_builtin_name_still_let_the_builtin_win(site):
    for dist in ("fork-a", "fork-b"):
        make_distribution(site, dist, "1.0", {"peftcore.methods": {"lora": "lora_fork:ForkMethod"}}, {"lora_fork.py": LORA_FORK})
    with pytest.warns(RuntimeWarning, match="also claimed by fork-a 1.0, fork-b 1.0"):
        assert registry.METHODS.entry("lora").builtin


BROKEN = """
import sys
sys.peftcore_import_attempts = getattr(sys, "peftcore_import_attempts", {})
sys.peftcore_import_attempts[__name__] = sys.peftcore_import_attempts.get(__name__, 0) + 1
raise ImportError("libfoo.so.1: cannot open shared object file")
"""


def test_broken_plugin_raises_when_asked_for_and_is_skipped_with_one_warning_otherwise(site):
    make_distribution(site, "peftcore-broken", "0.1", {
        "peftcore.methods": {"broken": "peftcore_broken_method:METHOD"},
        "peftcore.layers": {"lora.broken": "peftcore_broken_layer:HANDLER"},
    }, {"peftcore_broken_method.py": BROKEN, "peftcore_broken_layer.py": BROKEN})
    sys.peftcore_import_attempts = {}
    try:
        assert peftcore.methods()["broken"].distribution == "peftcore-broken"  # listing imports nothing
        assert sys.peftcore_import_attempts == {}
        for _ in range(2):
            with pytest.raises(PluginError, match=r"'broken' from distribution peftcore-broken 0\.1 failed to import.*libfoo") as info:
                peftcore.wrap(nn.Sequential(nn.Linear(3, 3)), "broken")
            assert isinstance(info.value.__cause__, ImportError)
        with pytest.warns(RuntimeWarning, match=r"skipping layer 'lora.broken'.*peftcore-broken 0\.1"):
            model = peftcore.wrap(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), "lora")
        assert len(model._peftcore.adapters["default"].targets) == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per broken entry, not on every use
            peftcore.wrap(nn.Sequential(nn.Linear(3, 3)), "lora")
        assert sys.peftcore_import_attempts == {"peftcore_broken_method": 1, "peftcore_broken_layer": 1}
    finally:
        del sys.peftcore_import_attempts


def test_unreadable_metadata_is_skipped_with_a_warning(site):
    garbled = make_distribution(site, "peftcore-garbled", "0.1", {"peftcore.methods": {"garbled": "x:y"}})
    (garbled / "entry_points.txt").write_text("[peftcore.methods]\nthis line has no equals sign\n")
    make_distribution(site, "nameless", "0.1", {"peftcore.methods": {"nameless": "x:y"}},
                      metadata="Metadata-Version: 2.1\nVersion: 0.1\n")
    with pytest.warns(RuntimeWarning) as record:
        names = set(peftcore.methods())
    messages = " | ".join(str(w.message) for w in record)
    assert "peftcore-garbled 0.1: its entry_points.txt cannot be read" in messages
    assert "METADATA has no Name" in messages
    assert "lora" in names and "garbled" not in names and "nameless" not in names


def test_unsupported_plugin_api_version_names_plugin_distribution_and_versions(site):
    make_distribution(site, "peftcore-future", "3.0", {
        "peftcore.methods": {"future": "peftcore_future:FutureMethod", "undeclared": "peftcore_future:Undeclared"},
    }, {"peftcore_future.py": "class FutureMethod:\n    peftcore_api = 99\n    name = 'future'\n\nclass Undeclared:\n    name = 'undeclared'\n"})
    with pytest.raises(PluginError, match=r"plugin 'future' from distribution peftcore-future 3\.0 was built for peftcore plugin "
                                          r"API version \[99\], but this peftcore supports \[1\] \(current: 1\)"):
        peftcore.wrap(nn.Sequential(nn.Linear(3, 3)), "future")
    with pytest.raises(PluginError, match="does not declare the peftcore plugin API.*peftcore_api = 1"):
        registry.get_method("undeclared")


def test_disable_plugins_at_run_time_keeps_builtins(shift, monkeypatch):
    assert "shift" in peftcore.methods()
    monkeypatch.setenv("PEFTCORE_DISABLE_PLUGINS", "1")
    names = set(peftcore.methods())
    assert "shift" not in names and "lora" in names
    assert all(info.distribution == "peftcore" for info in peftcore.methods().values())
    with pytest.raises(PluginError, match="no method named 'shift' \\(PEFTCORE_DISABLE_PLUGINS is set"):
        peftcore.wrap(nn.Sequential(nn.Linear(3, 3)), "shift")
    peftcore.wrap(nn.Sequential(nn.Linear(3, 3)), "lora")
    monkeypatch.delenv("PEFTCORE_DISABLE_PLUGINS")
    assert "shift" in peftcore.methods()  # no refresh needed


QLINEAR = """
import torch.nn.functional as F
from torch import nn

from peftcore.tuners.lora.layers import LoraLinear


class QLinear(nn.Linear):
    '''Stands for a quantized linear: a subclass with its own forward, which LoRA does not know.'''

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class QLinearHandler:
    method = "lora"
    linear_like = True
    priority = 1  # ahead of the built-in nn.Linear handler
    peftcore_api = 1

    def matches(self, module):
        return isinstance(module, QLinear)

    def wrap(self, module):
        return LoraLinear(module)


HANDLER = QLinearHandler()
"""


def test_layer_plugin_teaches_lora_a_new_module_type(site):
    (site / "peftcore_qlinear.py").write_text(QLINEAR)
    from peftcore_qlinear import QLinear  # the module type exists before its plugin is installed

    torch.manual_seed(0)
    model = nn.Sequential(QLinear(5, 4))
    with pytest.raises(UnsupportedModuleError, match=r"no layer handler for its type peftcore_qlinear\.QLinear"):
        peftcore.wrap(model, "lora", targets=["0"])
    make_distribution(site, "peftcore-qlinear", "0.2", {"peftcore.layers": {"lora.qlinear": "peftcore_qlinear:HANDLER"}})
    assert registry.layers()["lora.qlinear"].distribution == "peftcore-qlinear"
    x = torch.randn(3, 5)
    base = model(x)
    peftcore.wrap(model, "lora", rank=2)  # default targets now include it: the handler is linear_like
    assert type(model[0]).__name__ == "LoraLinear" and model[0].base_layer.__class__ is QLinear
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


KERNEL = """
from peftcore.ops.lora import reference_lora_linear

CALLS = []


class CountingKernel:
    op = "lora_linear"
    backend = "counting"
    devices = ("cpu",)
    priority = -1  # never chosen by auto
    hint = ""
    peftcore_api = 1

    def available(self):
        return True, ""

    def __call__(self, *args):
        CALLS.append(args[0].shape)
        return reference_lora_linear(*args)


KERNEL = CountingKernel()
"""


def test_kernel_plugin_through_entry_points(site, monkeypatch):
    make_distribution(site, "peftcore-counting", "1.1", {"peftcore.kernels": {"lora_linear.counting": "peftcore_counting:KERNEL"}},
                      {"peftcore_counting.py": KERNEL})
    assert registry.kernels()["lora_linear.counting"].version == "1.1"
    table = {(s.backend, s.distribution) for s in peftcore.backends("lora_linear")}
    assert ("counting", "peftcore-counting") in table
    model = peftcore.wrap(nn.Sequential(nn.Linear(5, 4)), "lora", rank=2, backend="counting")
    model(torch.randn(3, 5))
    import peftcore_counting

    assert peftcore_counting.CALLS == [torch.Size([3, 5])]
    monkeypatch.setenv("PEFTCORE_DISABLE_PLUGINS", "1")
    model(torch.randn(3, 5))  # a wrapped layer keeps the kernel it resolved ...
    peftcore.ops.dispatch.refresh()  # ... until dispatch.refresh() (docs/kernels.md)
    with pytest.raises(BackendUnavailableError, match="no backend 'counting'"):
        model(torch.randn(3, 5))


def test_register_kernel_in_code_is_used_and_removable():
    calls = []

    class Kernel:
        op, backend, devices, priority, hint = "lora_linear", "in_code", ("cpu",), -1, ""

        def available(self):
            return True, ""

        def __call__(self, *args):
            from peftcore.ops.lora import reference_lora_linear

            calls.append(1)
            return reference_lora_linear(*args)

    peftcore.register_kernel(Kernel())
    try:
        assert "in_code" in {s.backend for s in peftcore.backends("lora_linear")}
        model = peftcore.wrap(nn.Sequential(nn.Linear(5, 4)), "lora", rank=2, backend="in_code")
        model(torch.randn(2, 5))
        assert calls == [1]
    finally:
        registry.KERNELS.unregister("lora_linear.in_code")
    assert "in_code" not in {s.backend for s in peftcore.backends("lora_linear")}
