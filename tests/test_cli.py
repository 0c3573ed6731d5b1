"""The command line: options parse into the library's configs, and bad input exits with a clear error."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from peftcore.cli import _config, build_parser, main
from peftcore.train.config import FinetuneConfig


def _parse(*argv):
    return build_parser().parse_args(list(argv))


def test_finetune_defaults_are_the_config_defaults():
    assert _config(_parse("finetune")) == FinetuneConfig()


def test_compare_defaults_are_the_config_defaults():
    args = _parse("compare")
    assert args.methods is None and not args.in_process
    assert _config(args) == FinetuneConfig()


def test_every_finetune_option_reaches_the_config():
    args = _parse("finetune", "--strategy", "discriminative", "--lr", "1e-4", "--head-lr", "1e-3", "--lr-decay", "0.7", "--schedule", "one-cycle",
                  "--warmup", "0.2", "--grad-accum", "4", "--max-grad-norm", "0", "--l1", "1e-6", "--ewc", "1000",
                  "--ewc-data", "ref.csv", "--ewc-examples", "32", "--early-stopping", "3", "--early-stopping-metric", "macro_f1",
                  "--bf16", "--gradient-checkpointing", "--freeze-blocks", "2", "--freeze", ".*bias", "--unfreeze-every", "5",
                  "--blocks-per-stage", "2", "--blocks", "bert.encoder.layer", "--threads", "1", "--head", "classifier,pre_classifier",
                  "--method-option", "size=64", "--method-option", "placement=pfeiffer", "--method-option", "scale=0.5")
    config = _config(args)
    expected = dataclasses.replace(
        FinetuneConfig(), strategy="discriminative", lr=1e-4, head_lr=1e-3, lr_decay=0.7, schedule="one-cycle", warmup=0.2, grad_accum=4,
        max_grad_norm=0.0, l1=1e-6, ewc=1000.0, ewc_data="ref.csv", ewc_examples=32, early_stopping=3,
        early_stopping_metric="macro_f1", bf16=True, gradient_checkpointing=True, freeze_blocks=2, freeze=".*bias",
        unfreeze_every=5, blocks_per_stage=2, blocks="bert.encoder.layer", threads=1, head="classifier,pre_classifier",
        method_options={"size": 64, "placement": "pfeiffer", "scale": 0.5})
    assert config == expected
    strategy = config.strategy_config()
    assert strategy.head == ["classifier", "pre_classifier"] and strategy.lr_decay == 0.7 and strategy.method_options == {}
    assert strategy.head_lr == 1e-3


def test_peft_options_and_the_method_alias():
    config = _config(_parse("finetune", "--method", "lora", "--rank", "4", "--method-option", "rslora=true"))
    assert config.resolved_strategy == "lora"
    assert config.strategy_config().method_options == {"rank": 4, "alpha": 16.0, "dropout": 0.1, "rslora": True}
    assert _config(_parse("finetune", "--strategy", "prefix")).strategy_config().method_options == {}
    assert _config(_parse("finetune", "--head", r"cls(ifier)?")).strategy_config().head == r"cls(ifier)?"  # a regex stays a regex


def test_per_strategy_default_learning_rates():
    lr = {s: _config(_parse("finetune", "--strategy", s)).resolved_lr for s in ("lora", "full", "feature-extraction")}
    assert lr["full"] < lr["lora"] < lr["feature-extraction"]
    assert _config(_parse("finetune", "--strategy", "full", "--lr", "5e-5")).resolved_lr == 5e-5


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--method-option", "size"], "expected KEY=VALUE"),
    (["finetune", "--schedule", "step"], "invalid choice: 'step'"),
    (["finetune", "--early-stopping-metric", "auc"], "invalid choice: 'auc'"),
])
def test_malformed_options_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--method-option", "size=1", "--method-option", "size=2"], "--method-option size=... is given twice"),
    (["finetune", "--grad-accum", "0"], "--grad-accum must be a positive integer"),
    (["finetune", "--early-stopping", "-1"], "--early-stopping must be >= 0"),
    (["finetune", "--lr-decay", "0"], "--lr-decay must be in (0, 1]"),
    (["finetune", "--threads", "0"], "--threads must be a positive integer"),
    (["compare", "--methods", "lora,nope"], "unknown strategy 'nope' in --methods; available now:"),
    (["compare", "--methods", "lora,lora"], "--methods needs distinct strategy names"),
])
def test_bad_values_exit_with_a_clear_error(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_lists_the_commands_and_options(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "--methods" in text and "--in-process" in text and "--early-stopping" in text and "lora,adapter,prefix,prompt" in text
    assert main([]) == 2
    assert "finetune" in capsys.readouterr().out


@pytest.mark.slow  # about 5 s: a tiny BERT, one epoch
def test_finetune_bf16_with_lora(tmp_path, capsys):
    """``--bf16`` runs forward and loss under CPU bf16 autocast; LoRA's op follows it (it used to
    stop at the first layer fed bf16 with 'bias dtype Float differs from x dtype BFloat16')."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
    from train_models import save_tiny_model, write_subset

    model_dir = save_tiny_model(tmp_path / "tiny-bert")
    train, val = write_subset(tmp_path, 4, 2)
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        code = main(["finetune", "--no-progress", "--seed", "1", "--model", str(model_dir), "--data", str(train),
                     "--validation-data", str(val), "--strategy", "lora", "--rank", "4", "--epochs", "1", "--bf16",
                     "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["saved"] == "adapter" and all(loss == loss for loss in metrics["step_losses"])  # no NaN
    assert json.loads((out / "config.json").read_text())["bf16"]

