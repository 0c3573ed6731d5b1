"""Adapter directories in HF PEFT's format for the tests: read and write the two files by hand
(to make a directory PEFT-style or to damage one), and save/load through the public API."""

from __future__ import annotations

import json
from pathlib import Path

import peftcore


def read_dir(directory: Path) -> tuple[dict, dict]:
    """``(adapter_config.json, tensors)`` of an adapter directory."""
    from safetensors.torch import load_file

    return json.loads((directory / "adapter_config.json").read_text()), load_file(str(directory / "adapter_model.safetensors"))


def write_dir(directory: Path, config: dict, tensors: dict) -> Path:
    """Writes an adapter directory by hand (no checksums, as PEFT writes it)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    return directory


def load_peft_dir(model, directory: Path, tmp: Path | None = None):
    return peftcore.load(model, directory)


def save_native(model, directory: Path) -> Path:
    return peftcore.save(model, directory, format="peftcore")


def save_peft_dir(model, directory: Path, tmp: Path | None = None) -> Path:
    return peftcore.save(model, directory, format="peft")
