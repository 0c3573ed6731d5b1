"""The reference LoRA op against a hand computation."""

import torch

from peftcore.ops import lora, philox


def test_reference_matches_hand_computation():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])  # (M=2, K=2)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (N=3, K=2)
    b = torch.tensor([0.5, 0.0, -0.5])
    A = torch.tensor([[1.0, -1.0]])  # (r=1, K)
    B = torch.tensor([[2.0], [0.0], [1.0]])  # (N, r)
    # x @ A^T = [-1, 1];  (x A^T) B^T = [[-2, 0, -1], [2, 0, 1]];  scale 0.5
    expected = torch.tensor([[1.5 - 1.0, 2.0, 2.5 - 0.5], [0.5 + 1.0, -1.0, -1.5 + 0.5]])
    got = lora.reference_lora_linear(x, W, b, A, B, 0.5)
    torch.testing.assert_close(got, expected)


def test_reference_dropout_uses_the_philox_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    W, A, B = torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    keep = philox.keep_mask(123, x.shape, 0.25)
    expected = x @ W.T + 1.5 * ((x * keep / 0.75) @ A.T) @ B.T
    got = lora.reference_lora_linear(x, W, None, A, B, 1.5, dropout_p=0.25, seed=123)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_linear_dispatches_to_reference_by_name():
    x, W, A, B = torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4), torch.randn(3, 1)
    torch.testing.assert_close(
        lora.lora_linear(x, W, None, A, B, 1.0, backend="reference"),
        lora.reference_lora_linear(x, W, None, A, B, 1.0),
    )
