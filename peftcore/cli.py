"""The ``peftcore`` command line. Thin: parses options and calls the library."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from peftcore.errors import PeftcoreError


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from peftcore.train.finetune import FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a text classifier with an adapter",
        description="Fine-tune a transformers encoder for text classification with an adapter method. "
        "With no options: all-MiniLM-L6-v2 + LoRA on the bundled 'peftcore topics' dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=d.data, help="training file (CSV, TSV or JSONL); default: the bundled dataset")
    p.add_argument("--validation-data", default=d.validation_data, help="validation file; default: bundled split, or 20%% of --data")
    p.add_argument("--text-column", default=d.text_column, help="column holding the text")
    p.add_argument("--label-column", default=d.label_column, help="column holding the label")
    p.add_argument("--model", default=d.model, help="local transformers model directory; default: all-MiniLM-L6-v2")
    p.add_argument("--method", default=d.method, help="adapter method (see 'peftcore methods')")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training data")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    p.add_argument("--max-length", type=int, default=d.max_length, help="token limit per text")
    p.add_argument("--warmup", type=float, default=d.warmup, help="fraction of steps of linear warmup (then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--out", default=d.out, help="run directory; default: runs/finetune-<time>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(handler=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from peftcore.train.finetune import FinetuneConfig, run

    fields = {k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__}
    run(FinetuneConfig(**fields))
    return 0


def _run_methods(args: argparse.Namespace) -> int:
    import peftcore

    print(peftcore.methods())
    return 0


def _run_backends(args: argparse.Namespace) -> int:
    import peftcore

    print(peftcore.backends())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from peftcore import __version__

    parser = argparse.ArgumentParser(prog="peftcore", description="Parameter-efficient fine-tuning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"peftcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    _add_finetune(sub)
    sub.add_parser("methods", help="list the available adapter methods").set_defaults(handler=_run_methods)
    sub.add_parser("backends", help="list kernel backends and whether they are available").set_defaults(handler=_run_backends)
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
