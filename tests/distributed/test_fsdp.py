"""FSDP2 over a wrapped model: 2 ranks, gloo, launched by torch's launcher."""

import pytest
from dist_helpers import torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fsdp_result(tmp_path_factory):
    return torchrun("fsdp.py", tmp_path_factory.mktemp("fsdp"))


def test_lora_under_fully_shard_equals_single_process_training(fsdp_result):
    assert fsdp_result["moved"] > 1e-4
    assert fsdp_result["diff"] <= 1e-5


def test_the_frozen_base_is_sharded(fsdp_result):
    assert fsdp_result["sharded_base"]


def test_save_gathers_the_adapter_and_only_rank_zero_writes(fsdp_result):
    assert fsdp_result["written_by"] == ["adapter", "by-rank-0"]
    assert fsdp_result["base_class"] == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"  # not FSDPGPT2LMHeadModel


def test_load_before_sharding_restores_the_trained_adapter(fsdp_result):
    assert fsdp_result["loaded_diff"] == 0.0
    assert fsdp_result["loss_after_load"] > 0.0  # the loaded model runs sharded


def test_load_onto_a_sharded_model_is_refused_with_the_supported_order(fsdp_result):
    assert "sharded" in fsdp_result["refused"] and "then shard it" in fsdp_result["refused"]
