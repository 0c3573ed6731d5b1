"""``peftcore compare``: the table, the plot, failures, and every strategy learning on the bundled data."""

import json

import pytest

from peftcore.cli import main
from peftcore.train import compare as compare_mod
from peftcore.train import data
from peftcore.train.compare import DEFAULT_METHODS, compare, markdown_table, resolve_methods
from peftcore.train.config import FinetuneConfig
from train_models import write_subset

pytestmark = pytest.mark.usefixtures("single_thread")


def _row(strategy, accuracy=0.9):
    return {"strategy": strategy, "lr": 2e-3, "accuracy": accuracy, "macro_f1": accuracy - 0.05, "trainable": 1234567,
            "total": 23_000_000, "median_step_s": 0.2501, "peak_rss_mib": 1024.4, "seconds": 61.2}


def test_markdown_table():
    table = markdown_table([_row("lora"), {"strategy": "prompt", "error": "boom"}])
    lines = table.splitlines()
    assert lines[0].startswith("| strategy | lr | val. accuracy | macro-F1 | trainable parameters |")
    assert lines[2] == "| lora | 0.002 | 0.900 | 0.850 | 1,234,567 | 5.37 | 250 | 1024 | 61 |"
    assert lines[3].startswith("| prompt | | failed: boom |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_default_methods_leave_out_what_is_not_installed(monkeypatch):
    monkeypatch.setattr(compare_mod, "strategies", lambda: ["lora", "full", "partial"])
    assert resolve_methods(None) == (["lora", "full", "partial"], ["adapter", "prefix", "prompt", "feature-extraction",
                                                                    "progressive", "discriminative"])
    assert resolve_methods(["full", " lora"]) == (["full", "lora"], [])
    assert DEFAULT_METHODS[:4] == ("lora", "adapter", "prefix", "prompt")


@pytest.mark.slow
def test_compare_on_a_small_subset_writes_table_plot_and_reports_failures(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' own processes: one thread suits the tiny model
    train, val = write_subset(tmp_path, 4, 2)
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "lora,feature-extraction,partial", "--model", str(tiny_model_dir), "--data", str(train),
                 "--validation-data", str(val), "--epochs", "1", "--freeze-blocks", "9", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "failed: partial" in captured.err  # --freeze-blocks 9 does not fit a 2-block model
    table = (out / "compare.md").read_text()
    assert "| strategy | lr | val. accuracy | macro-F1 | trainable parameters | trainable % | median step (ms) | peak RSS (MiB)" in table
    assert table.rsplit("\n\n", 1)[1].strip() in captured.out  # the printed table is the written one
    rows = {r["strategy"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(rows) == {"lora", "feature-extraction", "partial"}
    assert "freeze_blocks=9 but the model has 2 blocks" in rows["partial"]["error"]
    for name in ("lora", "feature-extraction"):
        assert f"| {name} | " in table and (out / name / "metrics.json").is_file()
        assert rows[name]["peak_rss_mib"] > 50 and rows[name]["median_step_s"] > 0 and len(rows[name]["history"]) == 1
    assert rows["feature-extraction"]["trainable"] == 16 * 5 + 5 < rows["lora"]["trainable"]
    assert rows["lora"]["lr"] == 2e-3 and rows["feature-extraction"]["lr"] == 1e-2  # each strategy's own default
    png = (out / "compare.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 20_000
    assert (out / "logs" / "partial.log").read_text().strip().splitlines()[-1].startswith("error: ")
    # an existing comparison is not overwritten without --overwrite
    assert main(["compare", "--methods", "lora", "--out", str(out), "--no-progress"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_every_strategy_ends_above_the_untrained_model(tmp_path):
    """Each available strategy, trained briefly on part of the bundled training data, beats the
    untrained model on the bundled validation split."""
    train, _ = write_subset(tmp_path, per_class_train=12, per_class_val=0)
    base = FinetuneConfig(data=str(train), validation_data=str(data.BUNDLED / "validation.jsonl"), epochs=2, max_length=32, progress=False)
    result = compare(base, None, out=tmp_path / "cmp", isolate=False, log=lambda line: None)
    assert not result.failed, result.table
    assert [r["strategy"] for r in result.rows] == [m for m in DEFAULT_METHODS if m not in result.missing]
    for row in result.rows:
        assert row["accuracy"] > max(row["accuracy_before"], 0.2) + 0.1, (row["strategy"], row["accuracy_before"], row["accuracy"])
    assert (result.out / "compare.png").is_file() and "| full |" in result.table
