"""DDP on 2 ranks: every method's adapter equals single-process training on the global batch
(dropout 0); with LoRA dropout, runs repeat exactly, ranks draw different masks, and gradient
checkpointing (transformers' and torch.utils.checkpoint's) recomputes the same masks."""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import adapter_params, gpt2, lm_loss, max_diff, report, token_batches  # noqa: E402

import peftcore  # noqa: E402
from peftcore.train.distributed import ShardedLoss, seed_rank  # noqa: E402
from peftcore.train.finetune import enable_checkpointing  # noqa: E402

METHODS = {
    "lora": {"rank": 4, "backend": "cpp", "targets": ["c_attn", "c_proj", "c_fc"]},
    "adapter": {},
    "prefix": {},
    "prompt": {},
    "ia3": {},
    "dora": {"rank": 4},
}
STEPS, ROWS = 3, 5  # 5 rows: ranks take 3 and 2, so the loss weights matter


def perturb(model):
    """Non-zero trainable weights everywhere (zero-initialised factors would hide wrong gradients)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def build(method, options, dropout=0.0, seed=0):
    model = peftcore.wrap(gpt2(seed), method, **options, **({"dropout": dropout} if dropout else {}))
    perturb(model)
    return model.train()


def train(model, batches, distributed, seed=0, checkpoint=None):
    torch.manual_seed(seed)
    if checkpoint == "transformers":  # the model's own switch, as peftcore finetune --gradient-checkpointing does
        enable_checkpointing(model)
    if checkpoint == "torch":  # torch.utils.checkpoint directly, around each block
        from torch.utils.checkpoint import checkpoint as ckpt

        for block in model.transformer.h:
            block.forward = (lambda f: lambda *a, **k: ckpt(f, *a, use_reentrant=False, **k))(block.forward)
    run, loss_fn = model, lm_loss
    if distributed:
        run, loss_fn = DistributedDataParallel(model), ShardedLoss(lm_loss)
        seed_rank(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for batch in batches:
        loss_fn(run, batch).backward()
        opt.step()
        opt.zero_grad()
    return adapter_params(model)


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    batches = token_batches(STEPS, ROWS)
    result = {}
    for method, options in METHODS.items():
        model = build(method, options)
        reference = train(copy.deepcopy(model), batches, distributed=False)
        start = adapter_params(model)
        got = train(model, batches, distributed=True)
        result[method] = {"diff": max_diff(got, reference), "moved": max_diff(got, start)}

    # dropout 0.3 on the LoRA path: what each rank draws, and whether runs repeat
    lora = METHODS["lora"]
    runs = [train(build("lora", lora, dropout=0.3), batches, distributed=True, seed=7) for _ in range(2)]
    result["dropout_repeat_diff"] = max_diff(*runs)
    seed_rank(7)
    first = torch.tensor([int(torch.randint(0, 2**62, (), dtype=torch.int64))])
    seeds = [torch.zeros_like(first) for _ in range(dist.get_world_size())]
    dist.all_gather(seeds, first)
    result["rank_first_seeds"] = [int(s) for s in seeds]
    for mode in ("transformers", "torch"):
        checkpointed = train(build("lora", lora, dropout=0.3), batches, distributed=True, seed=7, checkpoint=mode)
        result[f"checkpoint_{mode}_diff"] = max_diff(checkpointed, runs[0])
    report(**result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
