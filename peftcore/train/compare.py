"""``peftcore compare``: several strategies on the same data, model and seed, side by side.

Each strategy runs as its own ``peftcore finetune`` job in a fresh Python process (so that its
peak memory is its own: an allocator keeps freed memory, and one run would inherit another's),
writing ``<out>/<strategy>/``. The comparison is written as ``compare.md`` (a markdown table:
validation accuracy, macro-F1, trainable parameters, median step time, peak memory),
``compare.json`` and ``compare.png`` (bar charts and validation-accuracy curves).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import peftcore
from peftcore.errors import ConfigError, PeftcoreError
from peftcore.train.config import FinetuneConfig
from peftcore.train.loop import progress_bar
from peftcore.train.plots import plot_comparison
from peftcore.train.strategies import LAYER_STRATEGIES, strategies

#: What ``--methods`` means when not given: every PEFT method the issue names, then the layer strategies.
DEFAULT_METHODS = ("lora", "adapter", "prefix", "prompt") + LAYER_STRATEGIES

#: Row variants, ``STRATEGY+VARIANT`` in ``--methods`` (``lora+fp16``, ``full+distill``): the
#: options each sets on top of the shared ones. ``distill`` and ``few-shot`` take the teacher and
#: K from ``--teacher`` / ``--few-shot``, which then apply to those rows only.
VARIANTS = {
    "fp16": {"fp16": True, "bf16": False},
    "bf16": {"bf16": True, "fp16": False},
    "distill": {},
    "few-shot": {},
}


def split_variant(name: str) -> tuple[str, str | None]:
    """``"lora+fp16"`` -> ``("lora", "fp16")``; ``"lora"`` -> ``("lora", None)``."""
    strategy, sep, variant = name.partition("+")
    return strategy, (variant if sep else None)


def row_config(base: FinetuneConfig, name: str, names: Sequence[str]) -> FinetuneConfig:
    """The configuration of the row ``name`` (``STRATEGY[+VARIANT]``) among ``names``.

    Raises:
        ConfigError: a ``distill`` row without ``--teacher`` or a ``few-shot`` row without ``--few-shot``.
    """
    strategy, variant = split_variant(name)
    config = dataclasses.replace(base, strategy=strategy, method="lora")
    variants = {split_variant(n)[1] for n in names}
    if "distill" in variants and variant != "distill":
        config = dataclasses.replace(config, teacher=None)
    if "few-shot" in variants and variant != "few-shot":
        config = dataclasses.replace(config, few_shot=None)
    if variant == "distill" and base.teacher is None:
        raise ConfigError(f"the row {name!r} needs --teacher RUN_DIR")
    if variant == "few-shot" and base.few_shot is None:
        raise ConfigError(f"the row {name!r} needs --few-shot K")
    return dataclasses.replace(config, **VARIANTS.get(variant, {}))


@dataclasses.dataclass
class CompareResult:
    """What a comparison produced.

    Attributes:
        out: the comparison directory.
        rows: one dict per strategy (``strategy``, ``accuracy``, ``macro_f1``, ``trainable``, ...,
            or ``error`` for a run that failed).
        table: the markdown table.
        missing: requested default methods that are not installed (left out).
    """

    out: Path
    rows: list[dict[str, Any]]
    table: str
    missing: list[str]

    @property
    def failed(self) -> list[str]:
        return [r["strategy"] for r in self.rows if "error" in r]


def resolve_methods(methods: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The strategies to run, and the default ones left out because they are not installed.

    Raises:
        ConfigError: an explicitly named strategy that is unknown here, or a duplicate.
    """
    available = strategies()
    if methods is None:
        return [m for m in DEFAULT_METHODS if m in available], [m for m in DEFAULT_METHODS if m not in available]
    names = [m.strip() for m in methods if m.strip()]
    bad = next((m for m in names if split_variant(m)[1] is not None and split_variant(m)[1] not in VARIANTS), None)
    if bad is not None:
        raise ConfigError(f"unknown variant in {bad!r} in --methods; variants: {', '.join('+' + v for v in VARIANTS)}")
    unknown = [m for m in names if split_variant(m)[0] not in available]
    if unknown:
        raise ConfigError(f"unknown strategy {unknown[0]!r} in --methods; available now: {', '.join(available)} "
                          "(adapter methods appear once their package or plugin is installed)")
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--methods needs distinct strategy names, got {', '.join(names) or 'none'}")
    return names, []


def _row(strategy: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "accuracy": metrics["accuracy_after"],
        "macro_f1": metrics["macro_f1_after"],
        "accuracy_before": metrics["accuracy_before"],
        "trainable": metrics["trainable_parameters"],
        "total": metrics["total_parameters"],
        "median_step_s": metrics["median_step_s"],
        "peak_rss_mib": metrics["peak_rss_mib"],
        "seconds": metrics["seconds"],
        "lr": metrics["lr"],
        "history": metrics["history"],
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a markdown table (failed runs show their error)."""
    header = ("| strategy | lr | val. accuracy | macro-F1 | trainable parameters | trainable % | median step (ms) | "
              "peak RSS (MiB) | run time (s) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['strategy']} | {r['lr']:g} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['trainable']:,} | "
            f"{100 * r['trainable'] / r['total']:.2f} | {1000 * r['median_step_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def _run_isolated(config: FinetuneConfig, log_file: Path) -> tuple[dict[str, Any] | None, str | None]:
    payload = json.dumps(dataclasses.asdict(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log_file, "w", encoding="utf-8") as fh:
        proc = subprocess.run([sys.executable, "-m", "peftcore.train._worker", payload], stdout=fh, stderr=None, env=env)
    metrics_file = Path(config.out) / "metrics.json"
    if proc.returncode == 0 and metrics_file.is_file():
        return json.loads(metrics_file.read_text(encoding="utf-8")), None
    lines = [l for l in log_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    error = next((l.removeprefix("error: ") for l in reversed(lines) if l.startswith("error: ")), None)
    return None, error or f"exit status {proc.returncode}; see {log_file}"


def _run_in_process(config: FinetuneConfig, log_file: Path) -> tuple[dict[str, Any] | None, str | None]:
    from peftcore.train.finetune import run

    with open(log_file, "w", encoding="utf-8") as fh:
        try:
            result = run(config, log=lambda line: print(line, file=fh, flush=True))
        except PeftcoreError as exc:
            print(f"error: {exc}", file=fh)
            return None, str(exc)
    return json.loads((result.run_dir / "metrics.json").read_text(encoding="utf-8")), None


def compare(
    base: FinetuneConfig,
    methods: Sequence[str] | None = None,
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    isolate: bool = True,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Runs each strategy with ``base``'s data, model, epochs and seed, and writes the comparison.

    Args:
        base: shared options; ``strategy`` is set per run, and ``lr`` stays each strategy's
            default unless ``base.lr`` is given (then every strategy uses it).
        methods: strategy names; ``None`` = every installed one of :data:`DEFAULT_METHODS`.
        out: the comparison directory; ``None`` = ``runs/compare-<time>``.
        overwrite: replace an existing directory.
        isolate: run each strategy in a fresh process (peak memory per strategy); ``False`` runs
            them here, faster, but then the memory column is the process's running peak.
        log: where progress lines go.

    Raises:
        ConfigError: unknown strategies or bad options, before anything runs.
    """
    from peftcore.train.finetune import prepare_run_dir, run_dir_path

    names, missing = resolve_methods(methods)
    base.validate()
    configs = {name: row_config(base, name, names) for name in names}  # errors before anything runs
    target = run_dir_path(None if out is None else str(out), overwrite, prefix="compare")
    target = prepare_run_dir(target, overwrite)
    (target / "logs").mkdir()
    if missing:
        log(f"not installed, left out: {', '.join(missing)}")
    rows = []
    runner = _run_isolated if isolate else _run_in_process
    bar = progress_bar(names, total=len(names), desc="compare", enabled=base.progress, leave=True)
    for name in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)
        config = dataclasses.replace(configs[name], out=str(target / name), overwrite=False)
        metrics, error = runner(config, target / "logs" / f"{name}.log")
        if metrics is None:
            rows.append({"strategy": name, "error": error})
            log(f"{name}: failed: {error}")
            continue
        row = _row(name, metrics)
        rows.append(row)
        log(f"{name}: validation accuracy {row['accuracy']:.3f}, macro-F1 {row['macro_f1']:.3f}, "
            f"{row['trainable']:,} trainable parameters, {1000 * row['median_step_s']:.0f} ms/step")
    table = markdown_table(rows)
    _write(target, base, rows, table, missing, isolate)
    return CompareResult(target, rows, table, missing)


def _write(target: Path, base: FinetuneConfig, rows: list[dict], table: str, missing: list[str], isolate: bool) -> None:
    dataset = base.data or "the bundled peftcore topics dataset"
    notes = [
        "# peftcore compare\n",
        f"Data: {dataset}; model: {base.model or 'all-MiniLM-L6-v2'}; {base.epochs} epochs, batch {base.batch_size}, "
        f"{base.schedule} schedule, seed {base.seed}, {base.threads or torch.get_num_threads()} torch threads"
        + (f" (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})." if "OMP_NUM_THREADS" in os.environ else "."),
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, peftcore {peftcore.__version__}.",
        "Peak RSS: the process's peak resident memory while training "
        + ("(each strategy in its own process)." if isolate else "(all strategies in one process: not comparable)."),
    ]
    if missing:
        notes.append(f"Not installed, so not compared: {', '.join(missing)}.")
    (target / "compare.md").write_text("\n".join(notes) + "\n\n" + table + "\n", encoding="utf-8")
    (target / "compare.json").write_text(json.dumps({"rows": rows, "missing": missing}, indent=2) + "\n", encoding="utf-8")
    done = [r for r in rows if "error" not in r]
    if done:
        plot_comparison(done, target / "compare.png", title=f"peftcore compare: {dataset}")
