"""tests/distributed: skipped where torch.distributed has no gloo; helpers in dist_helpers.py."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    if torch.distributed.is_available() and torch.distributed.is_gloo_available():
        return
    skip = pytest.mark.skip(reason="torch.distributed with the gloo backend is not available in this torch build")
    for item in items:
        if "tests/distributed" in str(item.fspath):
            item.add_marker(skip)
