"""transformer.dropout: the paper's dropout (§5.4) with a cheaper CPU mask, checked against its definition."""

import math

import pytest
import torch

from transformer.dropout import Dropout, keep_mask


def kept_scale(p: float) -> float:
    """1 / (1 - P_drop') for P_drop' = P_drop rounded to a multiple of 2^-16, by hand."""
    return 1.0 / (1.0 - round(p * 65536) / 65536)


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
    torch.testing.assert_close(y[kept], x[kept] * kept_scale(p), rtol=1e-6, atol=0)
    assert abs(kept_scale(p) * (1 - p) - 1) < 2e-5  # P_drop' within 2^-17 of P_drop
    assert within_5_sigma(kept.double().mean().item(), 1 - p, n)
    assert abs(y.double().mean().item() / x.double().mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n)  # unbiased


def test_the_four_quarters_of_a_random_word_decide_independently():
    # Elements 4i..4i+3 come from one 64-bit word: all four kept with probability (1 - p)^4, neighbours (1 - p)^2.
    p, n = 0.3, 1_000_000
    torch.manual_seed(1)
    keep = keep_mask(torch.Size([n]), p, CPU).double().view(-1, 4)
    assert within_5_sigma(keep.prod(1).mean().item(), (1 - p) ** 4, n // 4)
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3)):
        assert within_5_sigma((keep[:, a] * keep[:, b]).mean().item(), (1 - p) ** 2, n // 4)


def test_half_keeps_exactly_the_non_negative_16_bit_quarters():
    # The threshold for p = 1/2 is 0: the mask is the sign bits of the words' 16-bit quarters.
    torch.manual_seed(2)
    words = torch.empty(250, dtype=torch.int64).random_(-(2**63), None)
    torch.manual_seed(2)
    keep = keep_mask(torch.Size([10, 100]), 0.5, CPU)
    assert torch.equal(keep.flatten(), words.view(torch.int16).ge(0))


def test_threshold_rounds_p_to_a_multiple_of_2_to_the_minus_16():
    # p = 3/65536 drops exactly the quarters u < -2^15 + 3, i.e. the values -32768, -32767, -32766.
    torch.manual_seed(4)
    words = torch.empty(250_000, dtype=torch.int64).random_(-(2**63), None)
    torch.manual_seed(4)
    keep = keep_mask(torch.Size([1_000_000]), 3 / 65536, CPU)
    assert torch.equal(keep, words.view(torch.int16).ge(-32765))
    # p within 2^-17 of 1 rounds to 2^16 steps: all dropped and a kept share of 0, left to F.dropout, not inf · 0.
    assert torch.isfinite(Dropout(1 - 1e-6).train().residual(torch.ones(1000), torch.ones(1000))).all()


def test_gradient_is_the_scaled_mask_and_the_seed_fixes_it():
    p = 0.3
    d = Dropout(p).train()
    x = (torch.rand(64, 32) + 1.0).requires_grad_()
    torch.manual_seed(7)
    y = d(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() * kept_scale(p), rtol=1e-6, atol=0)
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
    torch.testing.assert_close(out, x + y * mask * kept_scale(p), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(x.grad, g)
    torch.testing.assert_close(y.grad, g * mask * kept_scale(p), rtol=1e-6, atol=0)


def test_bf16_input_keeps_its_dtype():
    d = Dropout(0.5).train()
    y = d(torch.ones(1000, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and set(y.unique().tolist()) <= {0.0, 2.0}
    assert d.residual(torch.zeros(1000, dtype=torch.bfloat16), torch.ones(1000, dtype=torch.bfloat16)).dtype == (
        torch.bfloat16
    )
