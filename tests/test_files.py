"""Adapter directories on disk: checksums verified at load, and saves that survive SIGKILL anywhere."""

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftcore
from models import minilm, mlp
from peftcore import files
from test_lifecycle import _assert_unchanged, _fingerprint

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _generation(g: float):
    """A wrapped MLP whose every adapter tensor holds the value ``g`` (its "generation")."""
    model = mlp()
    peftcore.wrap(model, "lora", rank=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.fill_(g)
    return model


def _generation_at(path: Path) -> float:
    """Loads the adapter at ``path`` (verified) and returns its generation; fails if it is not whole."""
    model = mlp()
    peftcore.load(model, path)
    values = {float(p.detach().flatten()[0]) for n, p in model.named_parameters() if "lora_" in n}
    assert len(values) == 1, f"tensors of different saves mixed in {path}: {values}"
    return values.pop()


def _data_offset(file: Path) -> int:
    header = int.from_bytes(file.read_bytes()[:8], "little")
    return 8 + header


# -- checksums ----------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = minilm()
    peftcore.wrap(model, "lora", rank=4, trainable=["classifier"])
    return peftcore.save(model, tmp_path / "adapter")


def test_save_records_a_sha256sums_file_that_sha256sum_reads(saved):
    import hashlib

    lines = (saved / files.CHECKSUM_FILE).read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in lines) == [CONFIG, WEIGHTS]
    for line in lines:
        digest, name = line.split("  ")
        assert digest == hashlib.sha256((saved / name).read_bytes()).hexdigest()


@pytest.mark.parametrize("corruption", ["random", "0xff"])
def test_damaged_tensor_data_is_refused_and_the_model_left_alone(saved, corruption):
    file = saved / WEIGHTS
    data = bytearray(file.read_bytes())
    start = _data_offset(file)
    rng = random.Random(0)
    for i in range(start + 16, min(len(data), start + 4096)):
        data[i] = 0xFF if corruption == "0xff" else rng.randrange(256)
    file.write_bytes(bytes(data))
    load_file(file)  # the header is intact: safetensors alone reads the damaged tensors
    model = minilm()
    fingerprint = _fingerprint(model)
    with pytest.raises(peftcore.CheckpointError, match=f"{WEIGHTS}' does not match the checksum"):
        peftcore.load(model, saved)
    _assert_unchanged(model, fingerprint)


def test_edited_config_is_refused_with_how_to_load_it_anyway(saved):
    config = saved / CONFIG
    config.write_text(config.read_text().replace('"default"', '"renamed"', 1))
    model = minilm()
    with pytest.raises(peftcore.CheckpointError, match=f"{CONFIG}' does not match.*delete its line from SHA256SUMS"):
        peftcore.load(model, saved)
    assert not peftcore.adapters(model)
    lines = [line for line in (saved / files.CHECKSUM_FILE).read_text().splitlines() if not line.endswith(CONFIG)]
    (saved / files.CHECKSUM_FILE).write_text("\n".join(lines) + "\n")
    assert list(peftcore.adapters(peftcore.load(model, saved))) == ["renamed"]


def test_directories_without_checksums_still_load(saved):
    (saved / files.CHECKSUM_FILE).unlink()
    model = minilm()
    peftcore.load(model, saved)
    assert list(peftcore.adapters(model)) == ["default"]


def test_a_damaged_checksum_file_is_refused(saved):
    (saved / files.CHECKSUM_FILE).write_text("not a checksum line\n")
    with pytest.raises(peftcore.CheckpointError, match="line 1 is not '<sha256>  <file name>'"):
        peftcore.load(minilm(), saved)


# -- crash safety ---------------------------------------------------------------------------------------

def _child(work) -> int:
    """Forks; the child runs ``work()`` and exits 0 (or is killed inside it). Returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            work()
        finally:
            os._exit(0)
    return pid


def _killed_at_line(k: int, model, path: Path) -> bool:
    """Runs ``save(model, path)`` in a child killed with SIGKILL at its k-th executed line of
    peftcore/files.py, where every write, flush and rename of a save happens (what persistence.py
    does before is in memory). Returns whether the kill happened."""
    watched = {str(Path(files.__file__))}

    def work():
        count = [0]

        def tracer(frame, event, arg):
            if frame.f_code.co_filename not in watched:
                return None
            if event == "line":
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return tracer

        sys.settrace(tracer)
        peftcore.save(model, path)

    _, status = os.waitpid(_child(work), 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _assert_whole(path: Path, allowed: set[float]) -> float:
    assert path.is_dir(), f"no adapter at {path} after a killed save"
    generation = _generation_at(path)
    assert generation in allowed
    return generation


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_sigkill_at_every_line_of_a_save_leaves_the_old_or_the_new_adapter(tmp_path, exchange, monkeypatch):
    if not exchange:
        monkeypatch.setattr(files, "_renameat2", lambda: None)
    path = tmp_path / "a"
    peftcore.save(_generation(1.0), path)
    new = _generation(2.0)
    kills = 0
    outcomes = set()
    for k in range(1, 10_000):
        files.remove_leftovers(path)  # every child starts from the same directory: the old adapter alone
        if not _killed_at_line(k, new, path):
            break  # the save ran to its end before line k
        kills += 1
        if exchange:
            outcomes.add(_assert_whole(path, {1.0, 2.0}))
        elif path.is_dir():  # the fallback's documented window: between its two renames, no path
            outcomes.add(_assert_whole(path, {1.0, 2.0}))
        if not path.is_dir() or _generation_at(path) == 2.0:
            peftcore.save(_generation(1.0), path)  # back to the old one for the next kill point
    assert kills >= 40 if exchange else kills >= 20, kills
    assert outcomes == {1.0, 2.0}  # kills landed both before and after the swap
    assert _generation_at(path) == 2.0  # the uninterrupted save at the end
    peftcore.save(new, path)
    assert [p.name for p in tmp_path.iterdir()] == ["a"], "the next save removes every leftover"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_at_random_times_during_repeated_saves(tmp_path):
    path = tmp_path / "a"
    peftcore.save(_generation(0.0), path)
    models = [_generation(float(g)) for g in range(1, 6)]
    start = time.perf_counter()
    for model in models:
        peftcore.save(model, path)
    per_save = (time.perf_counter() - start) / len(models)  # under this machine's load right now
    rng = random.Random(0)
    seen = set()
    for i in range(30):
        order = models[i % 5:] + models[: i % 5]  # each child starts at another generation

        def work():
            for model in order * 20:
                peftcore.save(model, path)

        pid = _child(work)
        time.sleep(rng.uniform(0.0, 8 * per_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(_assert_whole(path, {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}))
    assert len(seen) > 1
    peftcore.save(models[0], path)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_leftovers_of_a_live_process_are_kept(tmp_path):
    path = tmp_path / "a"
    peftcore.save(_generation(1.0), path)
    live = tmp_path / f".a.tmp-{os.getppid()}-0badcafe"  # the parent process is alive
    dead = tmp_path / ".a.tmp-999999999-0badcafe"  # no such pid
    other = tmp_path / ".b.tmp-999999999-0badcafe"  # a leftover of another target
    for d in (live, dead, other):
        d.mkdir()
    peftcore.save(_generation(2.0), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", live.name, other.name])
