"""transformer.Dropout: the paper's dropout (§5.4) with a CPU-friendly mask; checked against its definition."""

import math

import torch

from transformer.dropout import Dropout


def test_eval_is_identity_and_p_zero_is_identity():
    x = torch.randn(4, 5, 6)
    assert torch.equal(Dropout(0.3).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_kept_elements_are_scaled_by_one_over_keep_probability_and_the_rate_is_p():
    p, n = 0.2, 1_000_000
    x = torch.rand(n) + 1.0  # no zeros, so a zero output means dropped
    torch.manual_seed(0)
    y = Dropout(p).train()(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (1.0 / (1.0 - p)))
    # Bernoulli(1 - p) over n draws: the kept share lies within 5 standard deviations of 1 - p.
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_gradient_is_the_mask_and_the_seed_fixes_it():
    p = 0.3
    x = (torch.rand(64, 32) + 1.0).requires_grad_()
    torch.manual_seed(7)
    y = Dropout(p).train()(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / (1.0 - p))
    torch.manual_seed(7)
    assert torch.equal(Dropout(p).train()(x), y)


def test_bf16_input_keeps_its_dtype():
    y = Dropout(0.5).train()(torch.ones(1000, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and set(y.unique().tolist()) <= {0.0, 2.0}
