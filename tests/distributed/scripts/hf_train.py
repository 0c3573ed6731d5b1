"""A wrapped tiny BERT trained on 2 ranks by transformers' Trainer (under torchrun) or by an
Accelerate loop (under ``accelerate launch``); the saved adapter loads and equals the trained one.
Arguments: ``trainer|accelerate`` and an output directory shared by the ranks."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import adapter_params, max_diff  # noqa: E402

import peftcore  # noqa: E402
from peftcore.testing import tiny_model  # noqa: E402

STEPS = 3


def dataset(n=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (n, 8), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i[0] % 3} for i in ids]


def wrapped():
    return peftcore.wrap(tiny_model("bert"), "lora", rank=4, targets=["query", "value"], trainable=["classifier"]).train()


def with_trainer(out: Path):
    from transformers import Trainer, TrainingArguments

    model = wrapped()
    start = adapter_params(model)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=5e-2,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(out / "final"))  # save_pretrained on the main process; the adapter goes to final/adapter
    world, mode = trainer.args.world_size, str(trainer.args.parallel_mode)
    return model, start, out / "final" / "adapter", world, mode, torch.distributed.get_rank()


def with_accelerate(out: Path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = wrapped()
    start = adapter_params(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for step, batch in enumerate(loader):
        if step == STEPS:
            break
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.wait_for_everyone()
    inner = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        peftcore.save(inner, out / "adapter")
    accelerator.wait_for_everyone()
    mode = type(model).__name__
    return inner, start, out / "adapter", accelerator.num_processes, mode, accelerator.process_index


def main():
    kind, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    model, start, saved, world, mode, rank = (with_trainer if kind == "trainer" else with_accelerate)(out)
    if rank == 0:
        import json

        trained = adapter_params(model)
        loaded = adapter_params(peftcore.load(tiny_model("bert", seed=1), saved))
        print("RESULT " + json.dumps({"world": world, "mode": mode, "moved": max_diff(trained, start),
                                      "loaded_diff": max_diff(loaded, trained)}), flush=True)


if __name__ == "__main__":
    main()
