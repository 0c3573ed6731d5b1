"""The shared dropout generator: pinned Philox4x32-10 values, offsets, and mask statistics."""

import torch

from peftcore.ops import philox

# Produced by triton.language.randint4x(seed, offsets 0..1) under TRITON_INTERPRET=1.
SEED = 0x123456789ABCDEF
PINNED = [3092259374, 3314331723, 346529824, 2055536633, 2915701862, 1379798405, 1698698277, 2996427327]


def test_pinned_values_match_triton_philox():
    assert philox.random_bits(SEED, 8).tolist() == PINNED


def test_offsets_are_positions_not_call_boundaries():
    whole = philox.random_bits(7, 1000)
    assert torch.equal(philox.random_bits(7, 10, start=333), whole[333:343])


def test_high_counter_bits_are_used():
    counters = torch.tensor([0, 1 << 32], dtype=torch.int64)
    a, b = philox.philox4x32(5, counters)[0].tolist()
    assert a != b


def test_keep_fraction_and_determinism():
    mask = philox.keep_mask(42, (64, 1000), 0.3)
    assert abs(mask.float().mean().item() - 0.7) < 0.01
    assert torch.equal(mask, philox.keep_mask(42, (64, 1000), 0.3))
    assert not torch.equal(mask, philox.keep_mask(43, (64, 1000), 0.3))
    assert philox.keep_mask(1, (3, 4), 0.0).all()


def test_tensor_seeds_equal_int_seeds():
    for seed in (0, 7, SEED, 2**62 + 3, -5, -(2**63)):
        as_tensor = torch.tensor(seed, dtype=torch.int64)
        assert torch.equal(philox.random_bits(as_tensor, 50, start=3), philox.random_bits(seed, 50, start=3)), seed
    # a negative int64 seed is its two's-complement 64-bit pattern
    assert torch.equal(philox.random_bits(-5, 8), philox.random_bits(2**64 - 5, 8))


def test_threshold_boundaries():
    assert philox.threshold(0.0) == 0 and philox.threshold(0.5) == 2**30
    assert not philox.keep_mask(3, (1000,), 0.999999).all() and philox.keep_mask(3, (1000,), 1e-12).all()
