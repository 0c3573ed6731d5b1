"""The shared dropout generator: pinned Philox4x32-10 values, 16-bit draws, offsets, and mask statistics."""

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
    assert philox.threshold(0.0) == 0 and philox.threshold(0.5) == 2**15 and philox.threshold(0.1) == 6553
    assert philox.threshold(1 - 2**-20) == 2**16 - 1  # p < 1 always keeps the draw 0xffff
    assert not philox.keep_mask(3, (1000,), 0.999999).all() and philox.keep_mask(3, (1000,), 1e-12).all()


def test_draws_are_the_words_cut_in_halves_low_first():
    words = philox.random_bits(SEED, 8)
    expected = [half for w in words.tolist() for half in (w & 0xFFFF, w >> 16)]
    assert philox.draws(SEED, 16).tolist() == expected
    # one block (offsets 8g .. 8g + 7) is one Philox call: block 1 is counter 1's outputs
    block1 = philox.philox4x32(SEED, torch.tensor([1]))
    assert philox.draws(SEED, 8, start=8).tolist() == [h for w in block1 for h in (int(w) & 0xFFFF, int(w) >> 16)]


def test_draws_at_any_start_are_a_slice_of_the_stream():
    whole = philox.draws(11, 200)
    for start in (0, 1, 7, 8, 9, 63):
        assert torch.equal(philox.draws(11, 37, start=start), whole[start: start + 37]), start
    assert torch.equal(philox.keep_mask(11, (5, 7), 0.4, start=9), (whole[9:44] >= philox.threshold(0.4)).reshape(5, 7))


def test_draws_are_uniform_over_16_bits():
    u = philox.draws(2024, 1 << 18)
    assert u.min() >= 0 and u.max() < 2**16
    counts = torch.bincount(u >> 12, minlength=16).double()  # 16 bins of 4096 values
    expected = u.numel() / 16
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 45.0  # 15 degrees of freedom: P(chi2 > 45) < 1e-4
    # the two halves of a word are not the same draw
    assert (u[0::2] == u[1::2]).float().mean() < 1e-3


def test_keep_mask_rows_are_rows_of_the_whole_mask():
    rows = torch.tensor([4, 0, 2, 2, 1])
    for K in (1, 3, 8, 13, 64):
        for seed in (0, 7, 2**62, -5, torch.tensor(99)):
            full = philox.keep_mask(seed, (5, K), 0.4)
            assert torch.equal(philox.keep_mask_rows(seed, rows, K, 0.4), full[rows]), (K, seed)
    assert philox.keep_mask_rows(3, torch.zeros(0, dtype=torch.int64), 8, 0.5).shape == (0, 8)
