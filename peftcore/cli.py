"""The ``peftcore`` command line. Thin: parses options and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from peftcore.errors import ConfigError, PeftcoreError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless its help already says it, or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = action.nargs == 0  # --bf16, --no-progress: the flag's name says what it does
        if flag or "default" in text or action.default is None or action.default == [] or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (``8``, ``0.1``, ``true``, ``[1, 2]``), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. size=64), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _quantize_inits() -> tuple[str, ...]:
    from peftcore.train.config import QUANTIZE_INITS

    return QUANTIZE_INITS


def _add_data_options(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=d.data, help="training file (CSV, TSV or JSONL); default: the bundled dataset")
    g.add_argument("--validation-data", default=d.validation_data, help="validation file; default: bundled split, or 20%% of --data")
    g.add_argument("--text-column", default=d.text_column, help="column holding the text")
    g.add_argument("--label-column", default=d.label_column, help="column holding the label")
    g.add_argument("--model", default=d.model, help="local transformers model directory; default: all-MiniLM-L6-v2")
    g.add_argument("--max-length", type=int, default=d.max_length, help="token limit per text")


def _add_strategy_options(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("strategy options (each applies to the strategies named)")
    g.add_argument("--rank", type=int, default=d.rank, help="lora: rank")
    g.add_argument("--alpha", type=float, default=d.alpha, help="lora: alpha (scale = alpha / rank)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="lora: dropout")
    g.add_argument("--method-option", dest="method_options", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any peftcore.wrap option of the PEFT method, e.g. size=64 (adapter) or virtual_tokens=20; repeatable")
    g.add_argument("--freeze-blocks", type=int, default=d.freeze_blocks, help="partial: bottom blocks to freeze (default: half)")
    g.add_argument("--freeze", default=d.freeze, help="partial: also freeze parameters whose names fully match this regex")
    g.add_argument("--lr-decay", type=float, default=d.lr_decay,
                   help="discriminative (default 0.8) and progressive (default 1): rate factor per block going down")
    g.add_argument("--unfreeze-every", type=int, default=d.unfreeze_every,
                   help="progressive: optimizer steps between unfreezing stages (0: one stage per epoch)")
    g.add_argument("--blocks-per-stage", type=int, default=d.blocks_per_stage, help="progressive: blocks unfrozen per stage")
    g.add_argument("--blocks", default=d.blocks, help="the model's block list (dotted path or regex) if not found automatically")
    g.add_argument("--head", default=d.head, help="the task head: comma-separated module names, or a regex (default: found automatically)")


def _add_training_options(p: argparse.ArgumentParser, d) -> None:
    from peftcore.train.config import STOP_METRICS
    from peftcore.train.optim import SCHEDULES

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training data")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: per strategy, e.g. lora 2e-3, full 1e-4; half that with --quantize nf4|fp4)")
    g.add_argument("--head-lr", type=float, default=d.head_lr,
                   help="layer strategies: the task head's rate (default: --lr; 10 x --lr for progressive)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (gradient accumulation)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule (after linear warmup, except one-cycle)")
    g.add_argument("--warmup", type=float, default=d.warmup, help="fraction of steps of linear warmup (one-cycle: its rising phase)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (matrices only, not biases or norms)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the gradient norm (0: no clipping)")
    g.add_argument("--l1", type=float, default=d.l1, help="L1 penalty strength on the trained matrices (0: off)")
    g.add_argument("--ewc", type=float, default=d.ewc, metavar="STRENGTH",
                   help="EWC penalty strength against moving away from the starting weights (0: off), e.g. 1e4")
    g.add_argument("--ewc-data", default=d.ewc_data, help="reference data for EWC's Fisher information (default: the training data)")
    g.add_argument("--ewc-examples", type=int, default=d.ewc_examples, help="examples used to estimate the Fisher information")
    g.add_argument("--early-stopping", type=int, default=d.early_stopping, metavar="PATIENCE",
                   help="stop after this many epochs without a better validation metric, restoring the best weights (0: off)")
    g.add_argument("--early-stopping-metric", choices=list(STOP_METRICS), default=d.early_stopping_metric, help="metric early stopping watches")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (also on the CPU)")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 autocast with dynamic loss scaling (torch.amp.GradScaler): steps with inf/NaN gradients are skipped")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward: less memory, more time")
    g.add_argument("--quantize", default=d.quantize, choices=("nf4", "fp4", "int8", "torchao-int8"),
                   help="quantize the frozen base's linear layers (QLoRA; needs the peftcore-quant plugin), docs/quantization.md")
    g.add_argument("--quantize-init", default=d.quantize_init, choices=_quantize_inits(),
                   help="--quantize with LoRA: start from the quantized model (none: B = 0), or start the factors from the "
                        "quantization error, weighted by the first training examples' activations (calibrated) or alone (svd)")
    g.add_argument("--teacher", default=d.teacher, metavar="RUN_DIR",
                   help="knowledge distillation from the classifier of this 'peftcore finetune' run directory")
    g.add_argument("--few-shot", type=int, default=d.few_shot, metavar="K",
                   help="few-shot: a prototypical network trained on K examples per class, over --few-shot-seeds support sets")
    g.add_argument("--few-shot-seeds", type=int, default=d.few_shot_seeds, help="few-shot: support sets drawn (accuracy mean and std)")
    g.add_argument("--no-few-shot-baseline", dest="few_shot_baseline", action="store_false",
                   help="few-shot: skip the comparison run on all the training data")
    g.add_argument("--temperature", type=float, default=d.temperature, help="distillation temperature T")
    g.add_argument("--distill-weight", type=float, default=d.distill_weight, metavar="A",
                   help="distillation: loss = A * CE + (1 - A) * T^2 * KL(teacher || student)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--threads", type=int, default=d.threads,
                   help="torch intra-op threads (default: one per core); 1 is much faster on a machine busy with other jobs")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from peftcore.train.config import FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a text classifier with an adapter or another strategy",
        description="Fine-tune a transformers encoder for text classification. With no options: all-MiniLM-L6-v2 + "
        "LoRA on the bundled 'peftcore topics' dataset. Strategies: lora, adapter, prefix, prompt (peftcore methods, "
        "as installed), feature-extraction, partial, progressive, discriminative, full.",
        formatter_class=_Formatter,
    )
    p.add_argument("--strategy", default=d.strategy, help="fine-tuning strategy or peftcore method (default: --method)")
    p.add_argument("--method", default=d.method, help="adapter method (see 'peftcore methods'); same as --strategy for PEFT methods")
    _add_data_options(p, d)
    _add_strategy_options(p, d)
    _add_training_options(p, d)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="run directory; default: runs/finetune-<time>")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g = p.add_argument_group("processes")
    g.add_argument("--nproc", type=int, default=1,
                   help="processes (ranks) on this machine, started through torch's launcher; --batch-size is the global "
                   "batch; rank 0 prints and writes (several machines: torchrun ... -m peftcore finetune, docs/distributed.md)")
    p.set_defaults(handler=_run_finetune)


def _config(args: argparse.Namespace):
    from peftcore.train.config import FinetuneConfig

    fields = {k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__}
    options = fields.pop("method_options", [])
    keys = [k for k, _ in options]
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    if duplicate:
        raise ConfigError(f"--method-option {duplicate}=... is given twice")
    return FinetuneConfig(**fields, method_options=dict(options))


#: What ``pip install "peftcore[finetune]"`` adds that the training jobs import (module -> distribution).
FINETUNE_EXTRA = {"transformers": "transformers", "tqdm": "tqdm", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def require_finetune_extra(command: str) -> None:
    """Raises :class:`PeftcoreError` naming the extra to install when a module of it is missing."""
    import importlib

    missing = []
    for module, dist in FINETUNE_EXTRA.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise PeftcoreError(
            f"'peftcore {command}' needs {', '.join(missing)}, which the core install leaves out; install the finetune "
            "extra: pip install 'peftcore[finetune]' (from a source tree: pip install --no-build-isolation -e '.[finetune]')"
        )


def _run_finetune(args: argparse.Namespace) -> int:
    require_finetune_extra("finetune")
    from peftcore.train.finetune import run

    if args.nproc != 1:
        from peftcore.train.distributed import launch_finetune

        return launch_finetune(_config(args), args.nproc)
    run(_config(args))
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from peftcore.train.compare import DEFAULT_METHODS
    from peftcore.train.config import FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser(
        "compare",
        help="run several strategies on the same data and seed; write a table and a plot",
        description="Run each strategy as a 'peftcore finetune' job on the same data, model, epochs and seed (each in "
        "its own process, so that peak memory is its own), then write compare.md (a markdown table), compare.json and "
        "compare.png, and print the table. Each strategy uses its own default learning rate unless --lr is given.",
        formatter_class=_Formatter,
    )
    p.add_argument("--methods", default=None,
                   help=f"comma-separated strategies; default: those installed of {','.join(DEFAULT_METHODS)}")
    _add_data_options(p, d)
    _add_strategy_options(p, d)
    _add_training_options(p, d)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="comparison directory; default: runs/compare-<time>")
    g.add_argument("--overwrite", action="store_true", help="replace an existing comparison directory")
    g.add_argument("--in-process", action="store_true", help="run every strategy in this process (faster start; memory not comparable)")
    p.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    require_finetune_extra("compare")
    from peftcore.train.compare import compare

    out, overwrite = args.out, args.overwrite
    args.out, args.overwrite = None, False
    methods = args.methods.split(",") if args.methods is not None else None
    result = compare(_config(args), methods, out=out, overwrite=overwrite, isolate=not args.in_process)
    print()
    print(result.table)
    print(f"\nwritten: {result.out / 'compare.md'}, {result.out / 'compare.json'}, {result.out / 'compare.png'}")
    if result.failed:
        print(f"peftcore: error: failed: {', '.join(result.failed)} (logs in {result.out / 'logs'})", file=sys.stderr)
        return 1
    return 0


def _run_methods(args: argparse.Namespace) -> int:
    import peftcore

    print(peftcore.methods())
    return 0


def _run_backends(args: argparse.Namespace) -> int:
    import peftcore

    print(peftcore.backends())
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="rewrite an adapter directory in HF PEFT's or peftcore's format",
        description="Rewrites the adapter SRC (a directory in either format, or a Hub repository id) as DST in the "
        "format --to. LoRA and DoRA convert from their files alone; IA3, prompt and prefix tuning need the base "
        "model (use peftcore.load and peftcore.save(..., format=...)). See docs/interop.md.",
    )
    p.add_argument("src", metavar="SRC", help="adapter directory or Hub repository id (org/name)")
    p.add_argument("dst", metavar="DST", help="directory to write")
    p.add_argument("--to", required=True, choices=("peft", "peftcore"), help="the format to write")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (an adapter directory or empty)")
    p.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from peftcore.persistence import convert

    out = convert(args.src, args.dst, args.to, overwrite=args.overwrite)
    print(f"wrote {out} ({args.to} format)")
    return 0


def _add_new_plugin(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "new-plugin",
        help="write a plugin package to start from (method, layers or kernel)",
        description="Write the pip-installable package peftcore-NAME: pyproject.toml with the entry points, the module, "
        "a README, tests using peftcore's conformance kit, and a CI test matrix. Its tests pass right after "
        "'pip install --no-build-isolation -e DIR'. See docs/plugins.md.",
        formatter_class=_Formatter,
    )
    p.add_argument("name", metavar="NAME", help="the method, handler (lora.NAME) or backend (lora_linear.NAME) name, e.g. bitfit")
    p.add_argument("--kind", required=True, choices=("method", "layers", "kernel"), help="what the plugin adds")
    p.add_argument("--out", default=None, help="directory to create (default: ./peftcore-NAME)")
    p.set_defaults(handler=_run_new_plugin)


def _run_new_plugin(args: argparse.Namespace) -> int:
    from peftcore.plugin_template import new_plugin

    out = new_plugin(args.name, args.kind, args.out)
    print(f"wrote {out}; next: pip install --no-build-isolation -e {out} && python -m pytest {out / 'tests'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from peftcore import __version__

    parser = argparse.ArgumentParser(prog="peftcore", description="Parameter-efficient fine-tuning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"peftcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    _add_finetune(sub)
    _add_compare(sub)
    _add_convert(sub)
    sub.add_parser("methods", help="list the available adapter methods").set_defaults(handler=_run_methods)
    sub.add_parser("backends", help="list kernel backends and whether they are available").set_defaults(handler=_run_backends)
    _add_new_plugin(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftcore`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except PeftcoreError as exc:
        print(f"peftcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftcore: interrupted", file=sys.stderr)
        return 130
