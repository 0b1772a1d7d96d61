"""The logged training rows: token-weighted means over the window, derived by hand."""

import math
import time

import pytest

from transformer.progress import LogWindow, hms, progress_line


def test_a_row_weights_each_update_by_its_target_tokens_and_ignores_skipped_ones():
    w = LogWindow(lr=1e-4)
    w.add(True, loss=2.0, nll=1.0, tokens=10, grad_norm=0.5, lr=2e-4)
    w.add(False, loss=100.0, nll=100.0, tokens=1000, grad_norm=9.0, lr=3e-4)  # skipped: only its lr counts
    w.add(True, loss=4.0, nll=3.0, tokens=30, grad_norm=0.7, lr=4e-4)
    row = w.row(update=2, skipped=1, start_time=time.time() - 5.0)
    assert row["loss"] == pytest.approx((2.0 * 10 + 4.0 * 30) / 40)  # 3.5, not the mean of means 3.0
    assert row["nll"] == pytest.approx((1.0 * 10 + 3.0 * 30) / 40)
    assert row["ppl"] == pytest.approx(math.exp(2.5))
    assert (row["lr"], row["grad_norm"], row["skipped"], row["update"]) == (4e-4, 0.7, 1, 2)
    assert row["elapsed_s"] == pytest.approx(5.0, abs=1.0)
    assert w.tokens == 0 and w.loss_sum == 0.0  # the next row starts afresh


def test_progress_line_eta_is_the_update_budget_or_the_clock_whichever_ends_first():
    row = {"update": 10, "loss": 3.5, "ppl": 12.18, "lr": 1e-3, "tokens_per_s": 1000.0, "grad_norm": 0.7,
           "skipped": 0, "elapsed_s": 65.0}  # fmt: skip
    # 90 updates left of 2,000 tokens each at 1,000 tokens/s: 180 s
    assert progress_line(row, 2000.0, 90, None).endswith("elapsed 0:01:05 | ETA 0:03:00")
    assert progress_line(row, 2000.0, 90, time.time() + 60.5).endswith("ETA 0:01:00")
    assert hms(3 * 3600 + 7 * 60 + 9.9) == "3:07:09" and hms(float("inf")) == "?"
