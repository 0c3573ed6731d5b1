"""The registries: built-ins through entry points, code registration, conflicts, broken plugins."""

import dataclasses
import importlib.metadata as metadata
import warnings

import pytest

import peftcore
from peftcore import plugin, registry
from peftcore._entry_points import ENTRY_POINTS
from peftcore.errors import PluginError


def test_builtin_lora_comes_through_the_methods_group():
    info = peftcore.methods()["lora"]
    assert info.distribution == "peftcore" and info.version == peftcore.__version__
    assert info.value == "peftcore.tuners.lora.method:LoraMethod"
    assert "lora" in str(peftcore.methods())


def test_installed_metadata_declares_the_builtins():
    dist = metadata.distribution("peftcore")
    declared = {(ep.group, f"{ep.name} = {ep.value}") for ep in dist.entry_points}
    for group, specs in ENTRY_POINTS.items():
        for spec in specs:
            assert (group, spec) in declared, f"setup.py metadata lacks {spec} in {group}; reinstall peftcore"


def test_layer_handlers_for_lora():
    kinds = {h.kind for h in registry.layer_handlers("lora")}
    assert {"torch.nn.Linear", "transformers Conv1D", "torch.nn.Embedding"} <= kinds


class _Fake:
    def __init__(self, name="fake_method"):
        self.name = name
        self.config_class = dict
        self.merges = False
        self.identity_at_init = True
        for attr in ("resolve_targets", "check_targets", "attach", "detach", "adapter_parameters", "adapter_state",
                     "load_adapter_state", "set_active", "set_enabled", "merge", "unmerge"):
            setattr(self, attr, lambda *a, **k: None)


def test_register_method_in_code_and_replace():
    fake = _Fake()
    try:
        peftcore.register_method(fake)
        assert peftcore.methods()["fake_method"].distribution is None
        assert registry.get_method("fake_method") is fake
        with pytest.raises(PluginError, match="already registered in code; pass replace=True"):
            peftcore.register_method(_Fake())
        other = peftcore.register_method(_Fake(), replace=True)
        assert registry.get_method("fake_method") is other
    finally:
        registry.METHODS.unregister("fake_method")
    assert "fake_method" not in peftcore.methods()


def test_method_missing_attributes_is_rejected():
    class Incomplete:
        name = "incomplete"

    with pytest.raises(PluginError, match="lacks config_class"):
        peftcore.register_method(Incomplete())


def test_method_without_merges_is_rejected_at_registration_not_at_merge():
    fake = _Fake("no_merges")
    del fake.merges
    with pytest.raises(PluginError, match="lacks merges"):
        peftcore.register_method(fake)
    assert "no_merges" not in peftcore.methods()


def test_method_flags_and_functions_are_checked_against_the_protocol():
    fake = _Fake("string_flag")
    fake.merges = "yes"
    with pytest.raises(PluginError, match="must set merges to True or False"):
        peftcore.register_method(fake)
    fake = _Fake("data_merge")
    fake.merge = None
    with pytest.raises(PluginError, match="has merge but not as callables"):
        peftcore.register_method(fake)


def test_plugin_conflict_error_is_public():
    assert issubclass(peftcore.PluginConflictError, peftcore.PluginError)
    assert plugin.PluginConflictError is peftcore.PluginConflictError
    reg = plugin.Registry("peftcore.methods", "method")
    reg._discovered = {"dup": [_entry("dup", "dist-a"), _entry("dup", "dist-b")]}
    with pytest.raises(peftcore.PluginConflictError):
        reg.entry("dup")


def _entry(name, dist, value="json:loads", version="1.0"):
    return plugin.Entry("peftcore.methods", name, value, dist, version)


def test_conflicting_distributions_need_a_choice(monkeypatch):
    reg = plugin.Registry("peftcore.methods", "method")
    reg._discovered = {"dup": [_entry("dup", "dist-a"), _entry("dup", "dist-b", version="2.0")]}
    with pytest.raises(PluginError, match="claimed by dist-a 1.0 and dist-b 2.0.*PEFTCORE_PREFER"):
        reg.entry("dup")
    monkeypatch.setenv("PEFTCORE_PREFER", "dup=dist-b")
    assert reg.entry("dup").distribution == "dist-b"
    monkeypatch.delenv("PEFTCORE_PREFER")
    reg._resolved.clear()
    try:
        plugin.prefer("dup", "dist-a")
        assert reg.entry("dup").distribution == "dist-a"
    finally:
        plugin._preferences.clear()


def test_broken_plugin_raises_on_use_and_warns_otherwise():
    reg = plugin.Registry("peftcore.layers", "layer")
    reg._discovered = {"lora.broken": [plugin.Entry("peftcore.layers", "lora.broken", "no_such_module_xyz:thing", "broken-dist", "0.1")]}
    with pytest.raises(PluginError, match="broken-dist 0.1 failed to import") as info:
        reg.get("lora.broken")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.warns(RuntimeWarning, match="skipping layer 'lora.broken'"):
        assert list(reg.load_all("lora.")) == []


def test_api_version_mismatch_names_both_versions():
    class Old:
        peftcore_api = 0

    entry = _entry("old", "old-dist", version="0.3")
    with pytest.raises(PluginError, match="old-dist 0.3.*built for peftcore plugin API version \\[0\\].*supports \\[1\\]"):
        plugin.check_api_version(Old(), entry)
    with pytest.raises(PluginError, match="does not declare"):
        plugin.check_api_version(object(), entry)
    plugin.check_api_version(object(), _entry("b", "peftcore"))  # built-ins need no declaration


def test_disable_plugins_keeps_builtins(monkeypatch):
    monkeypatch.setenv("PEFTCORE_DISABLE_PLUGINS", "1")
    entries = plugin.discover("peftcore.methods")
    assert entries and all(e.builtin for e in entries)
    assert "lora" in {e.name for e in entries}


def test_malformed_prefer_variable(monkeypatch):
    monkeypatch.setenv("PEFTCORE_PREFER", "nonsense")
    with pytest.raises(PluginError, match="malformed item 'nonsense'"):
        plugin._env_preferences()


# -- behaviour added with the plugin system (issue 5) ----------------------------------------------
def test_prefer_reaches_every_registry_even_with_several_per_group(monkeypatch):
    """prefer() must invalidate the global registries' cached choices, however many exist."""
    monkeypatch.setattr(registry.METHODS, "_discovered", {"dup": [_entry("dup", "dist-a"), _entry("dup", "dist-b")]})
    plugin.Registry("peftcore.methods", "method")  # a second registry of the same group
    try:
        plugin.prefer("dup", "dist-b")
        assert registry.METHODS.entry("dup").distribution == "dist-b"
        plugin.prefer("dup", "dist-a")  # the cached resolution must be dropped
        assert registry.METHODS.entry("dup").distribution == "dist-a"
        assert peftcore.methods()["dup"].distribution == "dist-a"  # the catalogue shows the choice
        plugin.prefer("dup", None)
        with pytest.raises(plugin.PluginConflictError):
            registry.METHODS.entry("dup")
    finally:
        plugin._preferences.clear()
        registry.METHODS._forget("dup")


def test_failed_import_is_tried_once_and_warned_once(monkeypatch):
    attempts = []
    real_import = plugin.importlib.import_module

    def counting_import(name, *args):
        attempts.append(name)
        return real_import(name, *args)

    monkeypatch.setattr(plugin.importlib, "import_module", counting_import)
    reg = plugin.Registry("peftcore.layers", "layer")
    reg._discovered = {"lora.broken": [plugin.Entry("peftcore.layers", "lora.broken", "no_such_module_xyz:thing", "broken-dist", "0.1")]}
    for _ in range(3):
        with pytest.raises(PluginError, match="broken-dist 0.1 failed to import"):
            reg.get("lora.broken")
    with pytest.warns(RuntimeWarning, match="skipping layer 'lora.broken'"):
        assert list(reg.load_all("lora.")) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(reg.load_all("lora.")) == []
    assert attempts == ["no_such_module_xyz"]


def test_conflicts_raise_where_entries_are_enumerated():
    reg = plugin.Registry("peftcore.kernels", "kernel")
    reg._discovered = {"op.x": [plugin.Entry("peftcore.kernels", "op.x", "json:loads", d, "1") for d in ("kern-a", "kern-b")]}
    with pytest.raises(plugin.PluginConflictError, match="kernel 'op.x' .* claimed by kern-a 1 and kern-b 1"):
        list(reg.load_all("op."))


def test_setup_errors_of_a_plugin_are_wrapped_naming_it():
    # JSONDecodeError() needs arguments: the method validator's instantiation raises TypeError
    reg = plugin.Registry("peftcore.methods", "method", registry._validate_method)
    reg._discovered = {"bad": [plugin.Entry("peftcore.methods", "bad", "json:JSONDecodeError", "peftcore", "0")]}
    with pytest.raises(PluginError, match=r"'bad' from distribution peftcore 0 \(json:JSONDecodeError\) could not be set up: TypeError") as info:
        reg.get("bad")
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.parametrize("declared, message", [(0, "built for peftcore plugin API version \\[0\\]"), ("1", "must be an int or a tuple of ints")])
def test_code_registration_checks_the_api_version(declared, message):
    fake = _Fake("versioned")
    fake.peftcore_api = declared
    with pytest.raises(PluginError, match=message):
        peftcore.register_method(fake)
    assert "versioned" not in peftcore.methods()
    fake.peftcore_api = (1, 2)  # built for several versions, one of them ours
    try:
        peftcore.register_method(fake)
    finally:
        registry.METHODS.unregister("versioned")


def test_disable_plugins_is_read_at_each_lookup(monkeypatch):
    reg = plugin.Registry("peftcore.methods", "method")
    reg._discovered = {"lora": [_entry("lora", "peftcore")], "third": [_entry("third", "third-party")]}
    assert reg.names() == ["lora", "third"]
    monkeypatch.setenv("PEFTCORE_DISABLE_PLUGINS", "1")
    assert reg.names() == ["lora"] and "third" not in reg
    with pytest.raises(PluginError, match="no method named 'third' \\(PEFTCORE_DISABLE_PLUGINS is set"):
        reg.entry("third")
    monkeypatch.setenv("PEFTCORE_DISABLE_PLUGINS", "0")
    assert reg.entry("third").distribution == "third-party"


def test_layer_handler_priority_and_cache_follow_registrations():
    from peftcore.tuners.lora.layers import LINEAR

    first = registry.layer_handlers("lora")
    urgent = dataclasses.replace(LINEAR, kind="urgent", priority=5)
    peftcore.register_layer("lora.urgent", urgent)
    try:
        assert registry.layer_handlers("lora")[0] is urgent
    finally:
        registry.LAYERS.unregister("lora.urgent")
    assert registry.layer_handlers("lora") == first


def test_temporarily_restores_what_was_registered():
    original, other = _Fake("temp"), _Fake("temp")
    peftcore.register_method(original)
    try:
        with registry.METHODS.temporarily("temp", other) as registered:
            assert registered is other and registry.get_method("temp") is other
        assert registry.get_method("temp") is original
    finally:
        registry.METHODS.unregister("temp")
    with registry.METHODS.temporarily("temp", other):
        pass
    assert "temp" not in peftcore.methods()
