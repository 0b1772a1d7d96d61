"""Training progress as it is logged: token-weighted means over the updates since the last log row, and the
line rank 0 prints for it."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LogWindow:
    """The applied updates since the last log row. Means are weighted by target tokens, as the loss is, so a
    row over updates of different sizes is the loss per token over all of them, not a mean of means."""

    def __init__(self, lr: float):
        self.lr = lr
        self.reset(time.time())

    def reset(self, now: float) -> None:
        self.loss_sum, self.nll_sum, self.tokens, self.grad_norm, self.since = 0.0, 0.0, 0, 0.0, now

    def add(self, applied: bool, loss: float, nll: float, tokens: int, grad_norm: float, lr: float) -> None:
        if applied:
            self.loss_sum += loss * tokens
            self.nll_sum += nll * tokens
            self.tokens += tokens
            self.grad_norm = grad_norm  # the latest: a mean of norms means little
        self.lr = lr

    def row(self, update: int, skipped: int, start_time: float) -> dict:
        """The row for these updates (rate over the wall time since the last row); starts a new window."""
        now = time.time()
        tokens = max(self.tokens, 1)
        row = {
            "update": update,
            "loss": self.loss_sum / tokens,
            "nll": self.nll_sum / tokens,
            "ppl": math.exp(min(self.nll_sum / tokens, 700.0)),
            "lr": self.lr,
            "tokens_per_s": tokens / max(now - self.since, 1e-9),
            "grad_norm": self.grad_norm,
            "skipped": skipped,
            "elapsed_s": now - start_time,
        }
        self.reset(now)
        return row


def progress_line(r: dict, tokens_per_update: float, updates_left: int, deadline: float | None) -> str:
    """One log row as text, with the ETA of the update budget or of the clock, whichever ends first."""
    eta = updates_left * (r["tokens_per_s"] and tokens_per_update / r["tokens_per_s"])
    if deadline is not None:
        eta = min(eta, max(deadline - time.time(), 0.0))
    return (
        f"update {r['update']:>7} | loss {r['loss']:.3f} | ppl {r['ppl']:.2f} | lr {r['lr']:.3g} | "
        f"{r['tokens_per_s']:,.0f} tok/s | gnorm {r['grad_norm']:.3g} | skipped {r['skipped']} | "
        f"elapsed {hms(r['elapsed_s'])} | ETA {hms(eta)}"
    )


class TimeLedger:
    """Wall-clock seconds of the training loop by part: the step itself (forward, loss, backward, optimiser) and
    each thing around it, so that a run says what its time went to (metrics/train.json, `time_s`). On a GPU the
    step's kernels run asynchronously; the step ends with a host sync (its loss sums), so they count as step time."""

    PARTS = ("first_update", "steps", "batches", "update_hooks", "logging", "validation", "validation_hooks",
             "snapshots", "checkpoints")  # fmt: skip

    def __init__(self):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}
