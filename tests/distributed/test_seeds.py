"""The per-rank seed policy and the batch split, in one process."""

import torch

from peftcore.train.data import Batch
from peftcore.train.distributed import rank_seed, shard_batch, world


def test_rank_zero_keeps_the_seed_and_other_ranks_get_distinct_ones():
    assert rank_seed(42, 0) == 42
    seeds = {rank_seed(s, r) for s in range(4) for r in range(4)}
    assert len(seeds) == 16  # no (seed, rank) pair repeats another, unlike seed + rank
    assert rank_seed(0, 1) == rank_seed(0, 1) and 0 <= rank_seed(0, 1) < 2**63


def test_without_a_process_group_this_is_rank_zero_of_one():
    assert world() == (0, 1)


def test_shards_cover_the_batch_and_weights_make_the_mean():
    ids = torch.arange(10).reshape(5, 2)
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.arange(5))
    shards = [shard_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([s.labels for s, _ in shards]), batch.labels)
    assert [w for _, w in shards] == [2 * 3 / 5, 2 * 2 / 5]
    assert torch.equal(shards[1][0].inputs["input_ids"], ids[3:])
    # mean of weighted local means = global mean (what DDP's gradient average sees)
    values = batch.labels.float()
    assert torch.isclose(sum(w * values[s.labels].mean() for s, w in shards) / 2, values.mean())


def test_a_rank_without_rows_gets_one_row_of_weight_zero():
    batch = Batch({"input_ids": torch.ones(1, 3, dtype=torch.long)}, torch.zeros(1, dtype=torch.long))
    local, weight = shard_batch(batch, 1, 2)
    assert weight == 0.0 and local.labels.shape == (1,)
