"""Training on several processes with ``torch.distributed``: ranks, dropout seeds, DDP and FSDP2.

Nothing here starts processes or communicates by itself: processes come from torch's launcher
(``torchrun`` / ``python -m torch.distributed.run``, or ``accelerate launch``), communication
from the process group. A wrapped model is an ordinary module for ``DistributedDataParallel``
and ``fully_shard``; this module holds the few policies peftcore adds (see docs/distributed.md):

* **Dropout seeds.** LoRA layers draw each call's mask seed from torch's default generator.
  Every rank seeds that generator with the common seed while it builds and wraps the model (FSDP2
  does not broadcast weights, so initial adapters must agree), then with :func:`rank_seed` of
  its rank before training (:func:`seed_rank`): ranks draw different masks for their different
  rows, and a run is reproducible for a given world size and seed. Rank 0 keeps the seed itself,
  so a 1-process run equals an ordinary one; a run on ``N`` ranks does not draw the masks of a
  1-process run (with dropout 0 it computes the same steps).
* **Checkpoint recompute** needs nothing: ``torch.utils.checkpoint`` (and transformers'
  gradient checkpointing, which uses it) restores the generator before recomputing a block, so
  the recomputed forward draws the same seeds. Only ``preserve_rng_state=False`` breaks that.
* **Batches.** :func:`shard_batch` gives each rank its rows of a global batch and a loss weight,
  so that DDP's gradient average equals the gradient of the global batch's mean loss.
* **Files.** :func:`peftcore.save` writes from global rank 0 only (FSDP2: call it on every rank,
  it gathers the sharded adapter first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import sys
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from peftcore.errors import ConfigError, PeftcoreError
from peftcore.train.data import Batch

#: Seconds a collective waits for the other ranks before the run fails (a stuck rank).
DEFAULT_TIMEOUT_S = 600


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` without a process group."""
    if not _initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main_process() -> bool:
    """Whether this process is global rank 0 (or the only process)."""
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    """Whether torch's launcher started this process (it sets ``WORLD_SIZE`` and ``LOCAL_RANK``)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s generator for a run seeded with ``seed``.

    Rank 0 keeps ``seed``; other ranks get a 63-bit hash of ``(seed, rank)``, so that rank 1 of
    seed 0 does not repeat rank 0 of seed 1 (as ``seed + rank`` would).
    """
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"peftcore-rank-seed:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_rank(seed: int) -> int:
    """Seeds torch's default generator with this rank's :func:`rank_seed`; returns that seed.

    Call it after the model is built and wrapped under the common seed, before training.
    """
    derived = rank_seed(seed, world()[0])
    torch.manual_seed(derived)
    return derived


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Joins the process group that torch's launcher describes in the environment, if any.

    The backend is NCCL when CUDA is available, else gloo. Does nothing when a group already
    exists or the process was not launched for several ranks.

    Args:
        timeout_s: how long a collective waits for the other ranks before failing.

    Returns:
        Whether this call created the group (the caller then destroys it).
    """
    if _initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


@contextlib.contextmanager
def process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[int, int]]:
    """:func:`init_process_group` for the block (destroyed on exit if created here); yields :func:`world`."""
    created = init_process_group(timeout_s)
    try:
        yield world()
    finally:
        if created:
            torch.distributed.destroy_process_group()


# -- batches ------------------------------------------------------------------------------------
def shard_batch(batch: Batch, rank: int, world_size: int) -> tuple[Batch, float]:
    """This rank's rows of a global batch, and the weight of its mean loss.

    Rows are split as ``torch.tensor_split`` does (the first ranks take one more when the batch
    does not divide). The weight is ``world_size * local_rows / global_rows``: DDP averages
    gradients over ranks, so ``weight * local mean loss`` makes that average the gradient of the
    global batch's mean loss. A rank left without rows (a last batch smaller than the world)
    gets one row with weight 0, so that every rank still runs forward and backward.
    """
    rows = batch.labels.shape[0]
    index = torch.tensor_split(torch.arange(rows), world_size)[rank]
    weight = world_size * index.numel() / rows
    if index.numel() == 0:
        index = torch.arange(1)
    inputs = {k: v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v for k, v in batch.inputs.items()}
    return Batch(inputs, batch.labels[index]), weight


class ShardedLoss:
    """A ``loss_fn`` for :func:`peftcore.train.train_epoch` that trains on this rank's rows.

    The value it returns is the global batch's mean loss (all-reduced, for logging); its gradient
    is that of this rank's weighted share (see :func:`shard_batch`), so DDP's averaged gradient is
    the gradient of the global mean.
    """

    def __init__(self, loss_fn: Callable[[nn.Module, Batch], torch.Tensor]):
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        rank, size = world()
        local, weight = shard_batch(batch, rank, size)
        share = weight * self.loss_fn(model, local)
        total = share.detach().float().clone()
        if size > 1:
            torch.distributed.all_reduce(total)
        return share + (total / size - share.detach()).to(share.dtype)


# -- FSDP2 --------------------------------------------------------------------------------------
def fully_shard_blocks(model: nn.Module, blocks: Sequence[str] | str | None = None, **kwargs: Any) -> nn.Module:
    """``fully_shard`` on each transformer block, then on the root (FSDP2's usual layout).

    Wrap (or :func:`peftcore.load`) before sharding: the adapter's parameters then shard with
    the block they sit in, and the frozen base is sharded alike.

    Args:
        model: a wrapped model.
        blocks: the block list (dotted path or regex, as :func:`peftcore.train.model_structure`
            takes it); default: found automatically.
        kwargs: passed to every ``fully_shard`` call (``mesh=``, ``mp_policy=``, ...).

    Returns:
        ``model`` (sharded in place).
    """
    from torch.distributed.fsdp import fully_shard

    from peftcore.train.structure import find_blocks, find_head

    paths = find_blocks(model, blocks, find_head(model, None))
    modules = dict(model.named_modules())
    for path in paths:
        fully_shard(modules[path], **kwargs)
    fully_shard(model, **kwargs)
    return model


# -- the command line: several ranks through torch's launcher -----------------------------------
def launch_finetune(config: Any, nproc: int, log: Callable[[str], None] = print) -> int:
    """Runs ``peftcore finetune`` on ``nproc`` ranks of this machine through torch's launcher.

    Every rank runs :func:`peftcore.train.finetune.run` (``python -m peftcore.train._worker``);
    rank 0 alone prints and writes the run directory. When a rank dies or fails, the launcher
    stops the others and this function raises; a rank stuck in a collective fails after
    :data:`DEFAULT_TIMEOUT_S`.

    Args:
        config: the :class:`peftcore.train.config.FinetuneConfig`.
        nproc: ranks to start.

    Returns:
        0 when every rank finished.

    Raises:
        ConfigError: ``nproc`` < 1, or an option that cannot run on several ranks.
        PeftcoreError: a rank failed (the launcher's report above names the first).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    check_config(config, nproc)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
        "-m", "peftcore.train._worker", json.dumps(dataclasses.asdict(config)),
    ]
    env = dict(os.environ)
    threads = config.threads or max(1, (os.cpu_count() or 1) // nproc)
    env.setdefault("OMP_NUM_THREADS", str(threads))  # torchrun would print a warning and use 1
    rc = subprocess.call(command, env=env)
    if rc != 0:
        raise PeftcoreError(
            f"the distributed run failed: torch's launcher exited with status {rc} after a rank failed or died "
            "(its report above names the first failed rank and its exit code); nothing was written"
        )
    return 0


def check_config(config: Any, nproc: int) -> None:
    """Raises :class:`ConfigError` for finetune options that cannot run on ``nproc`` ranks."""
    if nproc > 1 and config.strategy_config().name == "progressive":
        raise ConfigError(
            "the progressive strategy changes which parameters train during the run, which DistributedDataParallel "
            "does not allow; run it with --nproc 1"
        )
    if nproc > 1 and config.batch_size < nproc:
        raise ConfigError(f"--batch-size {config.batch_size} is the global batch and must be at least --nproc {nproc}")
