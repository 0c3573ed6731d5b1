"""A strategy's parameter groups handed to ``transformers.Trainer``: a wrapped model trains with it."""

import pytest
import torch

from models import minilm, minilm_tokenizer
from peftcore.train import apply_strategy, build_optimizer, build_scheduler
from peftcore.train.data import bundled
from train_models import tiny_bert


def _trainer(model, plan, tmp_path, dataset, steps, schedule="linear"):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    optimizer = build_optimizer(plan.param_groups())
    scheduler = build_scheduler(optimizer, schedule, total_steps=steps, warmup_steps=1)
    return Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, scheduler))


def test_lora_wrapped_minilm_trains_with_trainer(tmp_path):
    model = minilm(num_labels=5)
    plan = apply_strategy(model, "lora", method_options={"rank": 4})
    train = bundled("train")
    labels = sorted(set(train.labels))
    tok = minilm_tokenizer()
    enc = tok(train.texts[:16], padding="max_length", truncation=True, max_length=24)
    dataset = [{"input_ids": torch.tensor(enc["input_ids"][i]), "attention_mask": torch.tensor(enc["attention_mask"][i]),
                "labels": torch.tensor(labels.index(train.labels[i]))} for i in range(16)]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in plan.named_parameters()}
    trainer = _trainer(model, plan, tmp_path, dataset, steps=3)
    result = trainer.train()
    assert result.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert any(not torch.equal(now[n], v) for n, v in trained.items() if ".lora_B." in n)
    assert not torch.equal(now["classifier.weight"], trained["classifier.weight"])


def test_layer_wise_rates_survive_trainer(tmp_path):
    model = tiny_bert()
    plan = apply_strategy(model, "discriminative", lr=1e-3, lr_decay=0.5)
    g = torch.Generator().manual_seed(0)
    dataset = [{"input_ids": (ids := torch.randint(1, 64, (6,), generator=g)), "labels": ids[0] % 3} for _ in range(8)]
    trainer = _trainer(model, plan, tmp_path, dataset, steps=3, schedule="constant")
    trainer.train()
    lrs = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert lrs["head"] == pytest.approx(1e-3)  # warmed up, constant
    assert lrs["block.1"] / lrs["block.2"] == pytest.approx(0.5) and lrs["embeddings"] / lrs["head"] == pytest.approx(0.5 ** 3)
