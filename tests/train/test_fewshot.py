"""Few-shot fine-tuning with a prototypical network: prototypes and logits against a hand
computation, support sets, episodic training, and ``finetune --few-shot K`` (mean and std over
seeds, next to the run on all data)."""

import json
import statistics

import pytest
import torch

from peftcore.cli import main
from peftcore.errors import DataError
from peftcore.train.data import TextDataset
from peftcore.train.fewshot import draw_support, mean_pool, prototype_logits, prototypes
from train_models import write_subset

pytestmark = pytest.mark.usefixtures("single_thread")


def test_prototypes_are_class_means_and_logits_negative_squared_distances():
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 2])
    protos = prototypes(emb, labels, 3)
    torch.testing.assert_close(protos, torch.tensor([[1.0, 0.0], [0.0, 4.0], [1.0, 1.0]]))
    queries = torch.tensor([[1.0, 2.0]])
    # distances^2: (0 + 4), (1 + 4), (0 + 1)
    torch.testing.assert_close(prototype_logits(queries, protos), torch.tensor([[-4.0, -5.0, -1.0]]))
    with pytest.raises(DataError, match="no support example for class"):
        prototypes(emb, labels, 4)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    torch.testing.assert_close(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0]]))


def test_support_sets_have_k_per_class_and_depend_on_the_seed():
    data = TextDataset([f"t{i}" for i in range(30)], ["a", "b", "c"] * 10)
    one, again, other = (draw_support(data, ["a", "b", "c"], 3, seed) for seed in (0, 0, 1))
    assert sorted(one.labels) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert one.texts == again.texts and one.texts != other.texts
    with pytest.raises(DataError, match="fewer than --few-shot 11"):
        draw_support(data, ["a", "b", "c"], 11, 0)


def _few_shot(tmp_path, *args, model_args=()):
    train, val = write_subset(tmp_path, 6, 4)
    out = tmp_path / "run"
    assert main(["finetune", "--no-progress", *model_args, "--data", str(train), "--validation-data", str(val), "--out", str(out),
                 *map(str, args)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_finetune_few_shot_lora_over_five_seeds_next_to_all_data(tmp_path, tiny_model_dir, capsys):
    out, metrics = _few_shot(tmp_path, "--few-shot", 3, "--epochs", 1, "--lr", "1e-2", model_args=["--model", str(tiny_model_dir)])
    seeds = metrics["seeds"]
    assert len(seeds) == 5 and len({s["seed"] for s in seeds}) == 5 and metrics["ways"] == 5 and metrics["episodes"] == 10
    accuracies = [s["accuracy"] for s in seeds]
    assert metrics["accuracy_mean"] == pytest.approx(statistics.fmean(accuracies))
    assert metrics["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]  # LoRA on the encoder
    assert all(s["last_loss"] is not None for s in seeds)
    # the same model and strategy trained on all the data, in its own run directory
    baseline = json.loads((out / "all-data" / "metrics.json").read_text())
    assert metrics["all_data_accuracy"] == baseline["accuracy_after"] and (out / "all-data" / "adapter").is_dir()
    printed = capsys.readouterr().out
    assert "+-" in printed and "5-way 3-shot" in printed


def test_frozen_encoder_trains_nothing(tmp_path, tiny_model_dir):
    _, metrics = _few_shot(tmp_path, "--few-shot", 2, "--strategy", "feature-extraction", "--few-shot-seeds", 5,
                           "--no-few-shot-baseline", model_args=["--model", str(tiny_model_dir)])
    assert metrics["episodes"] == 0 and metrics["trainable_parameters"] == 0 and metrics["all_data_accuracy"] is None
    assert all(s["accuracy"] == s["accuracy_before"] for s in metrics["seeds"])


def test_bad_few_shot_options(tmp_path, capsys):
    assert main(["finetune", "--few-shot", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--few-shot must be a positive integer" in capsys.readouterr().err
    assert main(["finetune", "--few-shot", "2", "--teacher", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "do not combine" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_four_shot_prototypes(tmp_path):
    """all-MiniLM-L6-v2 + LoRA, 4 examples per class: well above chance (0.2) over 5 seeds, and
    the episodes do not hurt the pretrained prototypes."""
    _, metrics = _few_shot(tmp_path, "--few-shot", 4, "--epochs", 1, "--lr", "1e-3", "--max-length", 32, "--no-few-shot-baseline")
    assert metrics["accuracy_mean"] > 0.6 and metrics["accuracy_std"] < 0.2, metrics["seeds"]
    assert metrics["accuracy_mean"] >= metrics["accuracy_before"] - 0.05, metrics["seeds"]
