"""DistributedDataParallel over wrapped models: 2 ranks, gloo, launched by torch's launcher."""

import pytest
from dist_helpers import torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ddp_result():
    return torchrun("ddp.py")


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt", "ia3", "dora"])
def test_every_method_equals_single_process_training_on_the_global_batch(ddp_result, method):
    got = ddp_result[method]
    assert got["moved"] > 1e-4  # the adapter trained
    assert got["diff"] <= 1e-5


def test_dropout_runs_repeat_for_the_same_seed_and_world_size(ddp_result):
    assert ddp_result["dropout_repeat_diff"] == 0.0


def test_ranks_draw_different_dropout_seeds(ddp_result):
    first = ddp_result["rank_first_seeds"]
    assert len(set(first)) == len(first)


@pytest.mark.parametrize("mode", ["transformers", "torch"])
def test_checkpointing_under_ddp_recomputes_the_same_masks(ddp_result, mode):
    assert ddp_result[f"checkpoint_{mode}_diff"] <= 1e-6
