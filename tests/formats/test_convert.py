"""``peftcore convert`` (no model needed for LoRA/DoRA) and Hub repository ids as adapter paths."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import peftcore
from models import llama, minilm, output_of, token_inputs
from peftcore.cli import main
from peftcore.errors import CheckpointError
from formats.test_peft_lora import peft_loaded, peft_saved

peft = pytest.importorskip("peft")

TOL = {"rtol": 0, "atol": 1e-5}


def _convert(capsys, *argv) -> tuple[int, str]:
    code = main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_convert_peft_to_peftcore_and_back_without_a_model(tmp_path, capsys):
    base, directory, expected = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj", "v_proj", "embed_tokens"],
                                           r=4, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    code, out = _convert(capsys, directory, tmp_path / "native", "--to", "peftcore")
    assert code == 0 and "peftcore format" in out
    config = json.loads((tmp_path / "native" / "adapter_config.json").read_text())
    assert config["format"] == "peftcore-adapter" and config["options"]["rank_pattern"] == {"v_proj": 2}
    assert config["target_kinds"]["model.embed_tokens"] == "embedding"
    native = peftcore.load(copy.deepcopy(base), tmp_path / "native")
    torch.testing.assert_close(output_of(native, token_inputs()), expected, **TOL)

    code, _ = _convert(capsys, tmp_path / "native", tmp_path / "peft2", "--to", "peft")
    assert code == 0
    torch.testing.assert_close(output_of(peft_loaded(base, tmp_path / "peft2"), token_inputs()), expected, **TOL)


def test_convert_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    _, directory, _ = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj"], r=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err = _convert(capsys, directory, tmp_path / "out", "--to", "peftcore")
    assert code == 2 and "exists; pass overwrite=True (--overwrite)" in err
    code, err = _convert(capsys, directory, tmp_path / "out", "--to", "peftcore", "--overwrite")
    assert code == 2 and "is not an adapter directory" in err  # --overwrite replaces adapters only
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert _convert(capsys, directory, tmp_path / "ok", "--to", "peftcore")[0] == 0
    assert _convert(capsys, directory, tmp_path / "ok", "--to", "peftcore")[0] == 2
    assert _convert(capsys, directory, tmp_path / "ok", "--to", "peftcore", "--overwrite")[0] == 0


def test_convert_names_what_the_target_format_cannot_hold(tmp_path, capsys):
    peftcore.save(peftcore.wrap(minilm(), "adapter"), tmp_path / "bottleneck")
    code, err = _convert(capsys, tmp_path / "bottleneck", tmp_path / "x", "--to", "peft")
    assert code == 2 and "HF PEFT's format cannot hold a 'adapter' adapter" in err
    peftcore.save(peftcore.wrap(llama(), "lora", rank=2, init="pissa", targets=["q_proj"]), tmp_path / "pissa")
    code, err = _convert(capsys, tmp_path / "pissa", tmp_path / "x", "--to", "peft")
    assert code == 2 and "init='pissa'" in err
    assert not (tmp_path / "x").exists()


def test_convert_of_ia3_says_it_needs_the_model(tmp_path, capsys):
    base = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                feedforward_modules=["down_proj"])).save_pretrained(str(tmp_path / "ia3"))
    code, err = _convert(capsys, tmp_path / "ia3", tmp_path / "x", "--to", "peftcore")
    assert code == 2 and "IA3 adapter" in err and "needs the base model" in err and "peftcore.load(model, SRC)" in err


# -- Hub repository ids -------------------------------------------------------------------------------
def _cache_repo(cache: Path, repo_id: str, directory: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """``directory``'s files placed by hand in the Hub cache layout (as snapshot_download leaves them)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(directory, repo / "snapshots" / commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    return cache


def test_hub_id_resolves_from_the_cache_offline(tmp_path, offline_cache):
    base, directory, expected = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj"], r=2)
    _cache_repo(offline_cache, "someone/tiny-lora", directory)
    model = peftcore.load(copy.deepcopy(base), "someone/tiny-lora")
    torch.testing.assert_close(output_of(model, token_inputs()), expected, **TOL)


def test_local_directory_wins_over_a_hub_id(tmp_path, offline_cache):
    base, directory, expected = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj"], r=2)
    _, other, _ = peft_saved("llama", tmp_path / "other", target_modules=["v_proj"], r=2)
    _cache_repo(offline_cache, "someone/tiny-lora", other)
    shutil.copytree(directory, tmp_path / "someone" / "tiny-lora")  # ./someone/tiny-lora, relative to the cwd
    model = peftcore.load(copy.deepcopy(base), "someone/tiny-lora")
    assert peftcore.lifecycle.get_state(model).adapters["default"].targets[0].endswith("q_proj")
    torch.testing.assert_close(output_of(model, token_inputs()), expected, **TOL)


def test_hub_id_offline_and_not_cached_is_a_clear_error(offline_cache):
    model = llama()
    with pytest.raises(CheckpointError, match="'someone/absent' is not in the cache .*hf-home/hub.* while HF_HUB_OFFLINE is set"):
        peftcore.load(model, "someone/absent")
    assert not hasattr(model, "_peftcore")


def test_hub_cache_env_is_read_at_call_time(tmp_path, monkeypatch):
    base, directory, expected = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj"], r=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    _cache_repo(tmp_path / "elsewhere", "org/name", directory)
    code = main(["convert", "org/name", str(tmp_path / "native"), "--to", "peftcore"])
    assert code == 0
    torch.testing.assert_close(output_of(peftcore.load(copy.deepcopy(base), tmp_path / "native"), token_inputs()), expected, **TOL)
