"""One ``peftcore compare`` run in its own process: ``python -m peftcore.train._worker '<config JSON>'``.

Prints the run's log to stdout; on a peftcore error prints ``error: <message>`` there (for
the parent to report) and to stderr, and exits with status 2.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from peftcore.errors import PeftcoreError
    from peftcore.train.config import FinetuneConfig
    from peftcore.train.finetune import run

    config = FinetuneConfig(**json.loads(argv[0]))
    try:
        run(config, log=lambda line: print(line, flush=True))
    except PeftcoreError as exc:
        print(f"error: {exc}", flush=True)
        print(f"peftcore: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
