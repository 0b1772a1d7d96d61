"""transformer.dropout: the paper's dropout (§5.4) with a cheaper CPU mask, checked against its definition."""

import math

import pytest
import torch

from transformer.dropout import Dropout, keep_mask

CPU = torch.device("cpu")


def within_5_sigma(share: float, prob: float, n: int) -> bool:
    return abs(share - prob) < 5 * math.sqrt(prob * (1 - prob) / n)


def test_eval_and_p_zero_are_the_identity():
    x, y = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    for d in (Dropout(0.3).eval(), Dropout(0.0).train()):
        assert torch.equal(d(x), x)
        assert torch.equal(d.residual(x, y), x + y)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.3])
def test_kept_share_is_one_minus_p_and_kept_elements_are_scaled(p):
    n = 1_000_000
    x = torch.rand(n) + 1.0  # no zeros, so a zero output means dropped
    torch.manual_seed(0)
    y = Dropout(p).train()(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1.0 - p), rtol=1e-6, atol=0)
    assert within_5_sigma(kept.double().mean().item(), 1 - p, n)


def test_both_halves_of_a_random_word_decide_independently():
    # Elements 2i and 2i+1 come from one 64-bit word: both kept with probability (1 - p)^2.
    p, n = 0.3, 1_000_000
    torch.manual_seed(1)
    keep = keep_mask(torch.Size([n]), p, CPU).double()
    both = (keep[0::2] * keep[1::2]).mean().item()
    assert within_5_sigma(both, (1 - p) ** 2, n // 2)


def test_half_keeps_exactly_the_non_negative_32_bit_words():
    # The threshold for p = 1/2 is 0: the mask is the sign bits of the words, read as int32.
    torch.manual_seed(2)
    words = torch.empty(500, dtype=torch.int64).random_(-(2**63), None)
    torch.manual_seed(2)
    keep = keep_mask(torch.Size([10, 100]), 0.5, CPU)
    assert torch.equal(keep.flatten(), words.view(torch.int32).ge(0))


def test_gradient_is_the_scaled_mask_and_the_seed_fixes_it():
    p = 0.3
    d = Dropout(p).train()
    x = (torch.rand(64, 32) + 1.0).requires_grad_()
    torch.manual_seed(7)
    y = d(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / (1.0 - p), rtol=1e-6, atol=0)
    torch.manual_seed(7)
    assert torch.equal(d(x), y)


def test_residual_is_x_plus_the_dropped_out_sublayer_with_its_gradients():
    p = 0.25
    d = Dropout(p).train()
    x, y = torch.randn(8, 7, 16, requires_grad=True), torch.randn(8, 7, 16, requires_grad=True)
    torch.manual_seed(3)
    out = d.residual(x, y)
    torch.manual_seed(3)
    mask = keep_mask(y.shape, p, CPU)
    torch.testing.assert_close(out, x + y * mask / (1 - p), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(x.grad, g)
    torch.testing.assert_close(y.grad, g * mask / (1 - p), rtol=1e-6, atol=0)


def test_bf16_input_keeps_its_dtype():
    d = Dropout(0.5).train()
    y = d(torch.ones(1000, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and set(y.unique().tolist()) <= {0.0, 2.0}
    assert d.residual(torch.zeros(1000, dtype=torch.bfloat16), torch.ones(1000, dtype=torch.bfloat16)).dtype == (
        torch.bfloat16
    )
