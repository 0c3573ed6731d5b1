"""FSDP2 (fully_shard per block and on the root) on 2 ranks: the LoRA adapter equals
single-process training on the global batch, the frozen base is sharded, peftcore.save gathers
the adapter and writes from rank 0 only, and peftcore.load works before sharding and refuses a
sharded model. Argument: a directory shared by the ranks."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import adapter_params, gpt2, lm_loss, max_diff, report, token_batches  # noqa: E402

import peftcore  # noqa: E402
from peftcore.train.distributed import ShardedLoss, fully_shard_blocks  # noqa: E402

OPTIONS = {"rank": 4, "backend": "cpp", "targets": ["c_attn", "c_proj", "c_fc"]}


def full(params):
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in params.items()}


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    batches = token_batches(3, 5)
    # every rank builds the same model and adapter: FSDP2 shards what each rank holds, it does not broadcast
    model = peftcore.wrap(gpt2(0), "lora", **OPTIONS).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(5))
    reference = copy.deepcopy(model)
    start = adapter_params(model)

    opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    for batch in batches:
        lm_loss(reference, batch).backward()
        opt.step()
        opt.zero_grad()
    expected = adapter_params(reference)

    fully_shard_blocks(model)
    base = model.transformer.h[0].mlp.c_fc.base_layer.weight
    sharded_base = isinstance(base, DTensor) and base.to_local().numel() < base.numel() and not base.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss_fn = ShardedLoss(lm_loss)
    for batch in batches:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    trained = full({n: p for n, p in model.named_parameters() if p.requires_grad})

    saved = peftcore.save(model, out / "adapter")  # every rank calls it: the gather is a collective
    peftcore.save(model, out / f"by-rank-{rank}", format="peftcore")  # only rank 0's call writes
    dist.barrier()
    config = json.loads((saved / "adapter_config.json").read_text())

    # load before sharding, on every rank, then shard: the loaded adapter trains on
    fresh = peftcore.load(gpt2(1 + rank), saved).train()  # a different base per rank: only the adapter is compared
    loaded = adapter_params(fresh)
    renamed = {n: loaded[n] for n in trained}
    fully_shard_blocks(fresh)
    loss_after_load = lm_loss(fresh, batches[0]).item()

    try:  # onto a sharded model: refused, with the order that works
        peftcore.load(fresh, saved, name="second")
        refused = ""
    except peftcore.CheckpointError as exc:
        refused = str(exc)
    report(diff=max_diff(trained, expected), moved=max_diff(trained, start), sharded_base=sharded_base,
           loaded_diff=max_diff(renamed, trained), base_class=config["peftcore"]["base_model"]["class"],
           written_by=sorted(p.name for p in out.iterdir()), loss_after_load=loss_after_load, refused=refused)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
