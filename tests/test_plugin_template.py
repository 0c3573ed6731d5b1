"""``peftcore new-plugin``: the generated packages install and pass their own tests.

The slow tests pip-install each kind into this environment (``--no-build-isolation --no-deps``:
nothing is fetched, torch is not touched), run its tests in a subprocess (so its entry points
never reach this process's registries), and uninstall it in a ``finally``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from peftcore import __version__
from peftcore.cli import main
from peftcore.errors import ConfigError
from peftcore.plugin import API_VERSION
from peftcore.plugin_template import KINDS, new_plugin

ENTRY_GROUPS = {"method": {"peftcore.methods", "peftcore.layers"}, "layers": {"peftcore.layers"}, "kernel": {"peftcore.kernels"}}


@pytest.mark.parametrize("kind", KINDS)
def test_generated_package_layout_and_entry_points(kind, tmp_path):
    out = new_plugin(f"probe_{kind}", kind, tmp_path / "pkg")
    project = tomllib.loads((out / "pyproject.toml").read_text())["project"]
    assert project["name"] == f"peftcore-probe-{kind}"
    assert set(project["entry-points"]) == ENTRY_GROUPS[kind]
    assert any(dep.startswith("peftcore>=") for dep in project["dependencies"])
    assert (out / "src" / f"peftcore_probe_{kind}" / "__init__.py").is_file()
    assert (out / "README.md").read_text().startswith(f"# peftcore-probe-{kind}")
    tests = (out / "tests" / f"test_probe_{kind}.py").read_text()
    assert ("check_kernel" if kind == "kernel" else "check_method") in tests
    module = (out / "src" / f"peftcore_probe_{kind}" / "__init__.py").read_text()
    assert f"peftcore_api = {API_VERSION}" in module or kind == "layers"  # Handler declares it itself
    workflow = (out / ".github" / "workflows" / "tests.yml").read_text()
    assert "matrix" in workflow and f"peftcore~={'.'.join(__version__.split('.')[:2])}.0" in workflow
    compile(module, "module", "exec")
    compile(tests, "tests", "exec")


def test_cli_and_argument_errors(tmp_path, capsys):
    assert main(["new-plugin", "bitfit", "--kind", "method", "--out", str(tmp_path / "a")]) == 0
    assert "pip install --no-build-isolation -e" in capsys.readouterr().out
    assert main(["new-plugin", "bitfit", "--kind", "method", "--out", str(tmp_path / "a")]) == 2  # not empty
    assert "exists and is not an empty directory" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must be lowercase"):
        new_plugin("Bad-Name", "method", tmp_path / "b")
    with pytest.raises(ConfigError, match="unknown kind 'op'"):
        new_plugin("x", "op", tmp_path / "c")
    with pytest.raises(SystemExit):
        main(["new-plugin", "x", "--kind", "op"])


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_generated_package_installs_and_passes_its_tests(kind, tmp_path):
    name = f"tmpl_{kind}"
    dist = f"peftcore-tmpl-{kind}"
    out = new_plugin(name, kind, tmp_path / dist)
    try:
        done = _pip("install", "--no-build-isolation", "--no-deps", "--no-index", "-q", "-e", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        env = {**os.environ, "PEFTCORE_DISABLE_PLUGINS": ""}
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=out, env=env,
                               capture_output=True, text=True, timeout=600)
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
        assert "2 passed" in tests.stdout
    finally:
        _pip("uninstall", "-y", "-q", dist)
    assert _pip("show", dist).returncode != 0  # the environment is clean again
