"""The §5.3 learning rate and optimiser, against numbers derived by hand."""

import pytest
import torch

from transformer.schedule import cooldown, make_optimizer, peak_rate, rate

D, WARMUP = 512, 4000


def test_rate_at_hand_derived_points():
    assert rate(1, D, WARMUP) == pytest.approx(D**-0.5 * 1 * WARMUP**-1.5)
    assert rate(WARMUP, D, WARMUP) == pytest.approx(D**-0.5 * WARMUP**-0.5)
    # Past warm-up the rate decays as step^-0.5: four times the steps, half the rate.
    assert rate(4 * WARMUP, D, WARMUP) == pytest.approx(rate(WARMUP, D, WARMUP) / 2)
    assert rate(0, D, WARMUP) == rate(1, D, WARMUP)  # step counts from 1
    assert rate(100, D, WARMUP, factor=2.0) == pytest.approx(2 * rate(100, D, WARMUP))


def test_peak_rate_of_base_is_7e_4():
    assert peak_rate(D, WARMUP) == pytest.approx(6.988e-4, rel=1e-3)  # 512^-0.5 · 4000^-0.5
    steps = range(1, 20 * WARMUP, 97)
    assert max(rate(s, D, WARMUP) for s in steps) <= peak_rate(D, WARMUP)


def test_linear_warmup_then_inverse_square_root_decay():
    assert rate(2000, D, WARMUP) == pytest.approx(rate(1000, D, WARMUP) * 2)
    assert rate(16000, D, WARMUP) == pytest.approx(rate(64000, D, WARMUP) * 2)


def test_optimizer_is_adam_with_the_papers_settings_and_per_update_schedule():
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = make_optimizer(model, D, WARMUP)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert (group["betas"], group["eps"]) == ((0.9, 0.98), 1e-9)
    for update in range(1, 6):  # the lr used by update n is rate(n)
        assert group["lr"] == pytest.approx(rate(update, D, WARMUP))
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()


def test_two_adam_updates_by_hand():
    # Bias-corrected Adam: update 1 moves by lr·g/(|g| + ε); with g again at update 2, m̂ = g and v̂ = g², so
    # again lr·g/(|g| + ε), at that update's lr. The fused kernel must do exactly the paper's Adam.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer, scheduler = make_optimizer(torch.nn.ParameterList([p]), D, warmup=2)  # lr 0.016, then 0.031
    g = torch.tensor([0.3, -0.01, 2.0])
    expected = p.detach().clone()
    for update in (1, 2):
        expected -= rate(update, D, 2) * g / (g.abs() + 1e-9)
        p.grad = g.clone()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_cooldown_multiplier_is_one_then_linear_to_zero():
    assert cooldown(0.0, 0.3) == 1.0 and cooldown(0.7, 0.3) == pytest.approx(1.0)
    assert cooldown(0.85, 0.3) == pytest.approx(0.5)  # halfway through the last 30%
    assert cooldown(1.0, 0.3) == 0.0 and cooldown(1.2, 0.3) == 0.0  # never negative past the budget
    assert cooldown(0.99, 0.0) == 1.0  # fraction 0: the paper's schedule


def test_optimizer_reads_progress_at_each_scheduler_step():
    model = torch.nn.Linear(3, 2)
    spent = [0.0]
    optimizer, scheduler = make_optimizer(model, D, WARMUP, cooldown_fraction=0.5, progress=lambda: spent[0])
    spent[0] = 0.75
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(rate(2, D, WARMUP) * 0.5)
