"""The dropout mask every backend shares: Philox4x32-10, counter-based, in plain PyTorch.

The mask is a pure function of (seed, element offset), so a kernel regenerates it in backward
instead of storing it, whatever its tiling, and every backend (reference, C++, Triton, CUDA)
draws the very same mask:

* key ``(k0, k1)`` = low and high 32 bits of the 64-bit seed;
* counter ``(c0, c1, c2, c3)`` = ``(g & 0xffffffff, g >> 32, 0, 0)`` where ``g = offset >> 3``;
* ten Philox rounds (constants as in Salmon et al. 2011 and ``triton.language.philox``);
* the four 32-bit outputs are cut into eight 16-bit draws, low half first: the element's draw
  ``u`` is half ``offset & 1`` of output ``(offset >> 1) & 3``, that is
  ``(out[(offset >> 1) & 3] >> (16 * (offset & 1))) & 0xffff``;
* the element is kept iff ``u >= threshold(p)`` with ``threshold(p) = floor(p * 2**16)``, and
  kept elements are scaled by ``1 / (1 - p)``.

``offset`` is the row-major index of the element in the op's input viewed as ``(M, K)``.

Sixteen bits per element, not 32: one Philox block serves eight elements, half the generator
work of one draw per 32-bit word, and the generator is most of what dropout costs on a CPU.
The drop probability is resolved to ``2**-16``: ``p = 0.1`` drops with probability
``6553 / 65536 = 0.099991``, and the expectation of a kept-and-scaled element is ``1 + 1e-5``.

The seed is a Python int or a 0-dim int64 tensor (its 64 bits, two's complement, are the key).
The tensor form keeps ``torch.compile`` graphs whole: no ``.item()`` is needed to draw a mask.
C++ and CUDA implement the same generator in ``csrc/philox.h``.
"""

from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


DRAW_BITS = 16


def threshold(p: float) -> int:
    """The 16-bit threshold below which a draw is dropped: ``floor(p * 2**16)``."""
    return int(p * 2**DRAW_BITS)


def _umulhi(a: int, b: torch.Tensor) -> torch.Tensor:
    # (a * b) >> 32 for a 32-bit constant a and 32-bit b held in int64, without overflow.
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    return (a * b_hi + ((a * b_lo) >> 16)) >> 16


def _key(seed: int | torch.Tensor) -> tuple[int | torch.Tensor, int | torch.Tensor]:
    # (k0, k1) = low and high 32 bits of the seed taken modulo 2**64. For an int64 tensor the
    # arithmetic shift sign-extends, and the mask drops those bits again.
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64)
        return seed & _MASK32, (seed >> 32) & _MASK32
    seed &= 0xFFFFFFFFFFFFFFFF
    return seed & _MASK32, seed >> 32


def philox4x32(seed: int | torch.Tensor, counter: torch.Tensor, rounds: int = N_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on counters ``(counter & 0xffffffff, counter >> 32, 0, 0)``.

    Args:
        seed: 64-bit key (low/high halves are k0/k1), an int (taken modulo 2**64) or a 0-dim
            int64 tensor (its two's-complement bits).
        counter: int64 tensor of block counters, any shape.

    Returns:
        Four int64 tensors holding the 32-bit outputs c0..c3, shaped like ``counter``.
    """
    k0, k1 = _key(seed)
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(rounds):
        prev_c0, prev_c2 = c0, c2
        c0 = _umulhi(PHILOX_ROUND_B, prev_c2) ^ c1 ^ k0
        c2 = _umulhi(PHILOX_ROUND_A, prev_c0) ^ c3 ^ k1
        c1 = (PHILOX_ROUND_B * prev_c2) & _MASK32
        c3 = (PHILOX_ROUND_A * prev_c0) & _MASK32
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def random_bits(seed: int | torch.Tensor, numel: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """The generator's 32-bit output words ``start .. start + numel - 1`` (int64 tensor).

    Word ``i`` is output ``i & 3`` of block ``i >> 2``: the raw Philox stream, in the order
    ``triton.language.randint4x`` yields it. The mask reads it sixteen bits at a time
    (:func:`draws`).
    """
    first, last = start >> 2, (start + numel - 1) >> 2
    counters = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    lanes = torch.stack(philox4x32(seed, counters), dim=1).reshape(-1)  # (4 * blocks,)
    skip = start - (first << 2)
    return lanes[skip: skip + numel]


def draws(seed: int | torch.Tensor, numel: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """The 16-bit draws ``u`` of element offsets ``start .. start + numel - 1`` (int64 tensor).

    Offset ``o`` reads half ``o & 1`` (low first) of word ``o >> 1`` of :func:`random_bits`.
    """
    first = start >> 1
    words = random_bits(seed, ((start + numel - 1) >> 1) - first + 1, device, start=first)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=1).reshape(-1)  # (2 * words,)
    skip = start - (first << 1)
    return halves[skip: skip + numel]


def keep_mask(seed: int | torch.Tensor, shape: tuple[int, ...] | torch.Size, p: float, device: torch.device | str = "cpu",
              start: int = 0) -> torch.Tensor:
    """The boolean keep-mask of dropout with probability ``p`` for a row-major tensor of ``shape``.

    ``start`` is the offset of its first element (a tile of a larger input).
    """
    numel = 1
    for size in shape:
        numel *= size
    if numel == 0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return (draws(seed, numel, device, start) >= threshold(p)).reshape(shape)


def keep_mask_rows(seed: int | torch.Tensor, rows: torch.Tensor, K: int, p: float) -> torch.Tensor:
    """Rows ``rows`` of ``keep_mask(seed, (M, K), p)``, drawing only those rows.

    A grouped op that handles each adapter's rows apart (``lora_grouped_add_``) draws the very
    mask the whole-input ops draw for those rows, without the draws of the other rows.

    Args:
        seed: as for :func:`keep_mask`.
        rows: ``(R,)`` int64 row indices into the input viewed as ``(M, K)``.
        K: the row length.
        p: dropout probability.

    Returns:
        ``(R, K)`` bool on ``rows``' device.
    """
    device = rows.device
    R = rows.shape[0]
    if R == 0 or K == 0:
        return torch.ones((R, K), dtype=torch.bool, device=device)
    start = rows.to(torch.int64) * K  # (R,) offset of each row's first element
    blocks = ((K + 7) >> 3) + 1  # enough 8-element blocks for a K-long run at any alignment
    counters = (start >> 3)[:, None] + torch.arange(blocks, dtype=torch.int64, device=device)  # (R, blocks)
    words = torch.stack(philox4x32(seed, counters), dim=-1).reshape(R, 4 * blocks)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1).reshape(R, 8 * blocks)
    cols = (start & 7)[:, None] + torch.arange(K, dtype=torch.int64, device=device)  # (R, K)
    return halves.gather(1, cols) >= threshold(p)
