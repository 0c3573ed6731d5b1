"""pytest-benchmark set-up for ``bench/``: thread count, and a summary table at the end.

Run everything (about 7 minutes on 2 cores)::

    python -m pytest bench/ --benchmark-only

``setup.cfg`` disables benchmarks for the test suite (``--benchmark-disable``); this conftest
turns them back on when ``bench/`` is run. ``PEFTCORE_BENCH_THREADS`` sets torch's thread count
(default 2, the machine the targets are stated for).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import summary  # noqa: E402  (bench/summary.py, needs the path above)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Undo setup.cfg's --benchmark-disable for this directory (pytest-benchmark refuses
    # --benchmark-only together with it).
    config.option.benchmark_disable = False
    torch.set_num_threads(int(os.environ.get("PEFTCORE_BENCH_THREADS", "2")))
    import e2e

    e2e.steady_allocator()  # the same malloc settings for every setup (see its docstring)


@pytest.fixture(scope="session")
def results() -> summary.Results:
    """Numbers the summary table at the end of the run is built from."""
    return summary.RESULTS


def pytest_terminal_summary(terminalreporter):
    if summary.RESULTS.empty():
        return
    terminalreporter.write_sep("=", "peftcore benchmark summary")
    terminalreporter.write_line(summary.RESULTS.render(threads=torch.get_num_threads()))
