"""Many adapters in one batch: routed inference (``adapter_names``), peftcore against the base
model and HF PEFT's ``adapter_names`` (issue 16).

all-MiniLM-L6-v2 in eval mode, LoRA adapters of rank 8 on query/key/value/dense, rows assigned to
the adapters round-robin. ``test_routed_forward``: batch 32 x 64, 8 adapters; base, peftcore and
HF PEFT forwards alternating (``interleave.interleaved``), ratios paired round by round.
``test_distinct_adapters``: batch 64 x 32 (the same 2048 rows, so that up to 64 examples can each
have their own adapter), 1 to 64 distinct adapters, peftcore and HF PEFT alternating per count.
Run::

    python -m pytest bench/test_routing.py --benchmark-only -s

The figures and the plot (``PEFTCORE_BENCH_PLOT=docs/multi-adapter-scaling.png``) are in
docs/benchmarks.md.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

import e2e
import summary
from interleave import interleaved

ROUNDS = int(os.environ.get("PEFTCORE_BENCH_ROUNDS", "10"))
COUNTS = (1, 2, 4, 8, 16, 32, 64)
RESULTS: dict[str, dict] = {}


def _randomise(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def _peftcore(n: int) -> torch.nn.Module:
    import peftcore

    model = e2e.load_model()
    for i in range(n):
        peftcore.wrap(model, "lora", name=f"a{i}", rank=8, alpha=16, targets=e2e.TARGETS)
    _randomise(model)
    return model.eval()


def _hf_peft(n: int) -> torch.nn.Module:
    import peft

    config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=e2e.TARGETS)
    model = peft.get_peft_model(e2e.load_model(), config, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config)
    _randomise(model)
    return model.eval()


def _forward(model, data, names=None):
    kwargs = {} if names is None else {"adapter_names": names}

    def forward():
        with torch.no_grad():
            return model(**data, **kwargs).logits

    return forward


def _data(size: int, length: int) -> dict[str, torch.Tensor]:
    data = e2e.batch(size, length)
    data.pop("labels")
    return data


def test_routed_forward(benchmark):
    data = _data(32, 64)
    names = [f"a{i % 8}" for i in range(32)]
    ours, theirs = _peftcore(8), _hf_peft(8)
    calls = {
        "base": _forward(e2e.load_model().eval(), data),
        "peftcore": _forward(ours, data, names),
        "hf_peft": _forward(theirs, data, names),
        "one_lora": _forward(_peftcore(1), data),  # no routing: one LoRA adapter for every row (its own cost)
    }
    benchmark.group = "routed forward, 8 adapters, interleaved"
    rounds = interleaved(benchmark, calls, 3 * ROUNDS)
    RESULTS["routed"] = rounds
    for key, ref in (("peftcore", "base"), ("peftcore", "hf_peft"), ("hf_peft", "base"), ("one_lora", "base"),
                     ("peftcore", "one_lora")):
        ratio = summary.paired_ratio(rounds[key], rounds[ref])
        print(f"\nrouted forward {key} / {ref}: {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]  "
              f"(medians {statistics.median(rounds[key]) * 1e3:.1f} / {statistics.median(rounds[ref]) * 1e3:.1f} ms)")


@pytest.mark.parametrize("count", COUNTS)
def test_distinct_adapters(benchmark, count):
    data = _data(64, 32)
    names = [f"a{i % count}" for i in range(64)]
    calls = {
        "base": _forward(e2e.load_model().eval(), data),
        "peftcore": _forward(_peftcore(count), data, names),
        "hf_peft": _forward(_hf_peft(count), data, names),
    }
    benchmark.group = f"routed forward, {count} distinct adapters"
    rounds = interleaved(benchmark, calls, ROUNDS)
    medians = {k: statistics.median(v) for k, v in rounds.items()}
    ratios = {k: summary.paired_ratio(rounds[k], rounds["base"]) for k in ("peftcore", "hf_peft")}
    RESULTS.setdefault("counts", {})[count] = {"median": medians, "ratio": ratios}
    print(f"\n{count} adapters: " + ", ".join(f"{k} {m * 1e3:.1f} ms" for k, m in medians.items()) + "; / base: "
          + ", ".join(f"{k} {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]" for k, r in ratios.items()))
    if count == COUNTS[-1]:
        _plot()


def _plot() -> None:
    target = os.environ.get("PEFTCORE_BENCH_PLOT")
    counts = RESULTS.get("counts", {})
    if not target or not counts:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(counts)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("peftcore", "peftcore (lora_grouped, cpp)"), ("hf_peft", "HF PEFT adapter_names")):
        left.plot(xs, [counts[x]["median"][key] * 1e3 for x in xs], marker="o", label=label)
        mid = [counts[x]["ratio"][key][0] for x in xs]
        low = [counts[x]["ratio"][key][1] for x in xs]
        high = [counts[x]["ratio"][key][2] for x in xs]
        right.errorbar(xs, mid, yerr=[[m - lo for m, lo in zip(mid, low)], [hi - m for m, hi in zip(mid, high)]],
                       marker="o", capsize=3, label=label)
    left.plot(xs, [counts[x]["median"]["base"] * 1e3 for x in xs], marker=".", color="grey", label="base model")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("distinct adapters in the batch (64 x 32 tokens)")
        ax.grid(alpha=0.3)
    left.set_ylabel("forward, median ms")
    right.set_ylabel("forward / base forward (paired, 95 % CI)")
    left.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, eval, LoRA rank 8 on q/k/v/dense, 2 threads")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
