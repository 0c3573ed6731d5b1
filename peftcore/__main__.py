"""``python -m peftcore``: the command line."""

from peftcore.cli import main

raise SystemExit(main())
