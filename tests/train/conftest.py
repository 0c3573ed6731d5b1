"""Fixtures of the training tests; the helpers live in train_models.py (importable from here)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_models import save_tiny_model  # noqa: E402


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny models spend their time in thread start-up and sync otherwise
    (measured: a tiny-BERT epoch took 1.1 s with 2 threads on a busy 2-core machine, 0.2 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local transformers directory holding a tiny random BERT and MiniLM's tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"))
