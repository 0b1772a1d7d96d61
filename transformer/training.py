"""The per-worker training loop: plain torch, testable without Ray (one process, or W processes under
`torch.distributed`). The Ray layer (`pipeline/train.py`) only builds a `Trainer` and passes `Hooks`.

One update = forward/backward over this worker's micro-batches of the global batch (`batching.BatchPlan`).
The loss is a sum normalised by the *global* target-token count, which every rank knows from the batch plan
without communication; DDP averages gradients over W ranks, so each rank scales its loss by W / tokens and the
summed gradient equals the 1-worker gradient. Dropout is reseeded from (seed, epoch, batch index, micro-batch
index) before every micro-batch, whichever worker runs it: a run resumed from a checkpoint, on the same number of
workers or another, draws exactly the masks the uninterrupted run would use.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from transformer.batching import Batch, BatchPlan, Position, collate, fixed_batches
from transformer.ema import WeightAverage
from transformer.loss import LossSums, projected_label_smoothed_nll_loss
from transformer.model import BOS_ID, EOS_ID, PAD_ID, Transformer, TransformerConfig
from transformer.progress import LogWindow, TimeLedger, progress_line
from transformer.rng import reseed, rng_state, set_rng_state
from transformer.schedule import make_optimizer


class NonFiniteTraining(RuntimeError):
    """The loss, the gradients or the weights are no longer finite: the params (learning rate, warm-up, clipping)
    or the data are at fault, and a restart from a checkpoint would replay the same updates."""


class TooManyBadUpdates(NonFiniteTraining):
    """`max_bad_updates` consecutive updates had a non-finite loss or gradient."""


@dataclass(frozen=True)
class TrainingConfig:
    update_tokens: int = 25_000  # global batch per update, padding counted (§5.1)
    max_tokens: int = 4096  # per forward pass on one worker
    max_updates: int = 100_000
    max_epochs: int | None = None
    lr_factor: float = 1.0
    warmup: int = 4000
    cooldown: float = 0.0  # share of the budget (max_updates or the deadline) over which lr decays to 0
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    label_smoothing: float = 0.1
    clip_norm: float = 0.0  # 0: measure the gradient norm, clip nothing
    seed: int = 1
    validate_every_updates: int = 1000
    log_every_updates: int = 100
    checkpoint_every_updates: int | None = None
    checkpoint_every_minutes: float | None = 10.0
    snapshot_every_minutes: float | None = None  # weights-only snapshots for the BLEU-over-time curve
    ema_decay: float | None = None  # an exponential moving average of the weights, kept in checkpoints (ema.py)
    train_copies: int = 1  # encodings of the training pairs back to back in train_data (BPE-dropout; BatchPlan)
    max_bad_updates: int = 10
    precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 elsewhere
    compile: bool = False
    start_time: float = field(default_factory=time.time)  # wall clock of the run's start (stage start)
    # Wall clock at which to stop, were the run never interrupted: the budget is deadline - start_time, and a
    # resumed run spends only what its checkpoint's clock (`elapsed_s`) has not (Trainer.load_state_dict).
    deadline: float | None = None


@dataclass
class Step:
    """The outcome of one update, identical on every rank."""

    loss: float  # label-smoothed loss per target token
    nll: float
    tokens: int  # target tokens of the global batch
    grad_norm: float
    lr: float
    applied: bool  # False: non-finite, skipped
    flags: tuple[bool, ...] = ()  # rank 0's clock decisions, shared: (checkpoint due, out of time, snapshot due)


class Hooks:
    """What the layer above (Ray, a test, a benchmark) plugs into the loop; every method runs on every rank."""

    def on_update(self, trainer: Trainer, step: Step) -> None: ...

    def on_log(self, trainer: Trainer, record: dict) -> None: ...

    def on_validate(self, trainer: Trainer, record: dict) -> None: ...

    def on_checkpoint(self, trainer: Trainer, state: dict | None, metrics: dict) -> None:
        """`state` is the full training state on rank 0 and None elsewhere (every rank is called, in step)."""

    def on_snapshot(self, trainer: Trainer, snapshot: dict | None) -> None:
        """`snapshot` (rank 0; None elsewhere): weights, config, update, tokens, `minutes` (the mark on the
        run's clock it stands for) and `elapsed_minutes` (when it was actually taken)."""


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: Tensor) -> Tensor:
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def marks_passed(elapsed_s: float, every_minutes: float | None) -> int:
    """How many snapshot marks (every, 2 every, 3 every ... minutes on the run's clock) `elapsed_s` has reached."""
    if every_minutes is None or elapsed_s < 0:
        return 0
    return int(elapsed_s // (every_minutes * 60.0))


class Trainer:
    """Model, optimiser, schedule, batch plan and position of one worker; `fit()` runs to the end."""

    def __init__(
        self,
        model_cfg: TransformerConfig,
        cfg: TrainingConfig,
        train_data,
        valid_data=None,
        device: torch.device | str = "cpu",
        wrap=None,
    ):
        self.cfg, self.model_cfg, self.device = cfg, model_cfg, torch.device(device)
        self.rank, self.world_size = world()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.module = Transformer(model_cfg).to(self.device)
        self.model: nn.Module = wrap(self.module) if wrap is not None else self.module  # DDP when W > 1
        if self.world_size > 1 and not hasattr(self.model, "no_sync"):
            raise ValueError("with several workers the model must be wrapped in DistributedDataParallel")
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self._progress = 0.0  # share of the budget spent, the same on every rank (train_step)
        self.optimizer, self.scheduler = make_optimizer(
            self.module, model_cfg.d_model, cfg.warmup, cfg.lr_factor, cfg.adam_betas, cfg.adam_eps,
            cfg.cooldown, lambda: self._progress,
        )  # fmt: skip
        # Not in the paper, opt-in: float32 shadow weights averaged after each applied update (transformer/ema.py).
        self.ema = WeightAverage(self.module, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.train_data, self.valid_data = train_data, valid_data
        lengths = train_data.src_lengths, train_data.tgt_lengths
        self.plan = BatchPlan(*lengths, cfg.update_tokens, cfg.max_tokens, cfg.seed, cfg.train_copies)
        self.valid_batches = (
            fixed_batches(valid_data.src_lengths, valid_data.tgt_lengths, cfg.max_tokens) if valid_data else []
        )
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.update, self.position, self.skipped, self.bad_in_row, self.tokens = 0, Position(), 0, 0, 0
        self.history: dict[str, list[dict]] = {"train": [], "valid": []}
        self._last_checkpoint = (-1, time.time())  # (update, wall clock)
        self._last_valid_update = -1
        # The run's clock reads time.time() - clock_start: the stage's clock, until a resume moves its zero so
        # that it goes on from the time the checkpoint carries (fairseq's cumulative training time, likewise).
        self.clock_start = cfg.start_time
        self.budget_s = None if cfg.deadline is None else cfg.deadline - cfg.start_time
        self._snapshots = marks_passed(self.clock(), cfg.snapshot_every_minutes)  # marks done
        self._last_snapshot_update = -1
        self.window = LogWindow(self.scheduler.get_last_lr()[0])
        self._first_update: tuple[float, float] | None = None  # (start, seconds) of this process's first update
        self.ledger = TimeLedger()

    # --- one update ---

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def dummy_batch(self) -> Batch:
        one = torch.tensor([[EOS_ID]], dtype=torch.long)
        return Batch(one, torch.tensor([[BOS_ID]], dtype=torch.long), one.clone())

    def micro_step(self, indices: np.ndarray | None, scale: float, sync: bool) -> Tensor:
        """Forward/backward of one micro-batch; a None slot runs a dummy batch with weight 0 so that every
        rank makes the same number of DDP backward calls. Returns (loss sum, nll sum) of real tokens."""
        batch = (collate(self.train_data, indices) if indices is not None else self.dummy_batch()).to(self.device)
        no_sync = getattr(self.model, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with ctx:
            sums = self.loss_sums(self.forward, batch)
            weight = scale if indices is not None else 0.0
            (sums.loss * weight).backward()
        return torch.stack([sums.loss.detach(), sums.nll.detach()]) * (1.0 if indices is not None else 0.0)

    def loss_sums(self, model: nn.Module, batch: Batch) -> LossSums:
        # Only non-pad target positions are projected onto the vocabulary, and the loss projects them a chunk
        # at a time: the (N, V) logits would be the largest tensor of a step.
        keep = batch.tgt_out.ne(PAD_ID)  # (B, T)
        with self.autocast():
            hidden = model(batch.src, batch.tgt_in, keep, project=False)  # (N, d_model)
            weight = self.module.embed.weight  # the pre-softmax projection, shared with the embeddings (§3.4)
            return projected_label_smoothed_nll_loss(hidden, weight, batch.tgt_out[keep], self.cfg.label_smoothing)

    def train_step(self, global_batch: list[np.ndarray], flags: tuple[bool, ...] = ()) -> Step:
        self.model.train()
        tokens = self.plan.target_tokens(global_batch)
        shards = self.plan.shard(global_batch, self.rank, self.world_size)
        sums = torch.zeros(2, device=self.device)
        for k, indices in enumerate(shards):
            # The masks of micro-batch j depend on (epoch, batch, j) alone, not on which rank runs it or how many
            # ranks there are: an elastic run that goes 2 -> 1 -> 2 workers draws the masks of a 1-worker run.
            reseed(self.cfg.seed, self.position.epoch, self.position.index, self.rank + k * self.world_size)
            sums += self.micro_step(indices, self.world_size / tokens, sync=k == len(shards) - 1)
        max_norm = self.cfg.clip_norm if self.cfg.clip_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm, foreach=True)
        # Gradients are already synchronised, so the norm is the same everywhere; the loss sums are not.
        bad = (~torch.isfinite(sums).all() | ~torch.isfinite(grad_norm)).float()
        # Rank 0's clock decides for all: its flags and the share of the time budget it has spent.
        mine = [float(f) if self.rank == 0 else 0.0 for f in (*flags, self.clock_progress())]
        stats = all_reduce(torch.cat([sums.float(), bad.reshape(1), torch.tensor(mine, device=self.device)]))
        s = stats.tolist()
        applied = s[2] == 0
        lr = self.scheduler.get_last_lr()[0]
        if applied:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            self.update, self.bad_in_row, self.tokens = self.update + 1, 0, self.tokens + tokens
            self._progress = max(self.update / self.cfg.max_updates, s[-1])
            self.scheduler.step()
        else:
            self.skipped, self.bad_in_row = self.skipped + 1, self.bad_in_row + 1
        self.optimizer.zero_grad(set_to_none=True)
        self.position = self.plan.next_position(self.position)
        if self.bad_in_row >= self.cfg.max_bad_updates:
            raise TooManyBadUpdates(
                f"{self.bad_in_row} consecutive updates had a non-finite loss or gradient (last at epoch "
                f"{self.position.epoch}); lower lr_factor, raise warmup or set clip_norm"
            )
        return Step(s[0] / tokens, s[1] / tokens, tokens, float(grad_norm), lr, applied, tuple(f > 0 for f in s[3:-1]))

    # --- validation ---

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss and perplexity on the valid split; each rank takes every W-th batch and the sums are reduced."""
        self.module.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for indices in self.valid_batches[self.rank :: self.world_size]:
            s = self.loss_sums(self.module, collate(self.valid_data, indices).to(self.device))
            sums += torch.stack([s.loss.double(), s.nll.double(), s.tokens.double()])
        loss, nll, tokens = all_reduce(sums).tolist()
        self.module.train()
        self._last_valid_update = self.update
        tokens = max(tokens, 1.0)
        record = {"update": self.update, "valid_loss": loss / tokens, "valid_nll": nll / tokens}
        record["valid_ppl"] = math.exp(min(record["valid_nll"], 700.0))
        self.history["valid"].append(record)
        return record

    # --- state ---

    def state_dict(self) -> dict:
        """Everything to continue exactly; plain containers and tensors for `torch.load(weights_only=True)`."""
        return {
            "model": self.module.state_dict(),
            "config": self.model_cfg.to_dict(),
            "update": self.update,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "position": {"epoch": self.position.epoch, "index": self.position.index},
            "skipped": self.skipped,
            "bad_in_row": self.bad_in_row,
            "tokens": self.tokens,
            "history": self.history,
            "rng": rng_state(),
            "world_size": self.world_size,
            "elapsed_s": self.clock(),  # on the run's clock: where the BLEU curve puts it, what a resume goes on from
        } | ({"ema": self.ema.state_dict()} if self.ema is not None else {})

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.model_cfg.to_dict():
            raise ValueError(f"checkpoint model config {state['config']} differs from {self.model_cfg.to_dict()}")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("checkpoint has no weight average: train.ema_decay was not set when it was written")
            self.ema.load_state_dict(state["ema"])
        self.update, self.skipped, self.tokens = state["update"], state["skipped"], state["tokens"]
        self.bad_in_row = state["bad_in_row"]
        self.position = Position(**state["position"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        set_rng_state(state["rng"])  # state["world_size"] may differ: neither data order nor masks depend on it
        self._last_checkpoint = (self.update, time.time())
        self._last_valid_update = self.history["valid"][-1]["update"] if self.history["valid"] else -1
        # The clock goes on from the checkpoint's reading: the time budget, the cool-down that follows it and the
        # snapshot marks come out as in an uninterrupted run; the time lost to the crash and restart is not
        # charged (the updates since the checkpoint are redone). Older checkpoints carry no clock: the stage's.
        if state.get("elapsed_s") is not None:
            self.clock_start = time.time() - state["elapsed_s"]
        self._snapshots = marks_passed(self.clock(), self.cfg.snapshot_every_minutes)

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.module.parameters())

    # --- the loop ---

    def clock_flags(self) -> tuple[bool, bool, bool]:
        """(checkpoint due by time, out of time, snapshot due) by this rank's clock; rank 0's decides for all."""
        now, every = time.time(), self.cfg.checkpoint_every_minutes
        due = every is not None and now - self._last_checkpoint[1] >= every * 60
        snapshot = marks_passed(now - self.clock_start, self.cfg.snapshot_every_minutes) > self._snapshots
        return due, self.clock_progress() >= 1.0, snapshot

    def clock(self) -> float:
        """Seconds on the run's clock: since the stage started, plus what the checkpoint resumed from carried."""
        return time.time() - self.clock_start

    def deadline(self) -> float | None:
        """The wall clock at which this rank's clock runs out of the time budget (None without one)."""
        return None if self.budget_s is None else self.clock_start + self.budget_s

    def clock_progress(self) -> float:
        """The share of the wall-clock budget spent by this rank's clock (0 without a deadline)."""
        if self.budget_s is None:
            return 0.0
        return min(1.0, self.clock() / self.budget_s) if self.budget_s > 0 else 1.0

    def done(self) -> str | None:
        if self.update >= self.cfg.max_updates:
            return "max_updates"
        if self.cfg.max_epochs is not None and self.position.epoch > self.cfg.max_epochs:
            return "max_epochs"
        return None

    def fit(self, hooks: Hooks | None = None) -> dict:
        """Train until max_updates, max_epochs or the deadline; validate and checkpoint at the end too."""
        hooks = hooks or Hooks()
        reason, timed = self.done(), self.ledger.part
        while reason is None:
            with timed("batches"):
                global_batch = self.plan.epoch(self.position.epoch)[self.position.index]  # the first plans the epoch
            started = time.time()
            with timed("steps" if self._first_update is not None else "first_update"):
                step = self.train_step(global_batch, self.clock_flags())
            if self._first_update is None:
                self.first_update_done(started)
            self.accumulate(step)
            with timed("update_hooks"):
                hooks.on_update(self, step)
            every = self.cfg.checkpoint_every_updates
            if step.applied and self.update % self.cfg.log_every_updates == 0:
                with timed("logging"):
                    hooks.on_log(self, self.log_record())
            if step.applied and self.valid_batches and self.update % self.cfg.validate_every_updates == 0:
                self.validate_and_tell(hooks)
            # Snapshot first: the checkpoint's clock then covers the mark it took, so a run resumed from this
            # update never takes that mark again (a checkpoint write can outlast a short snapshot interval).
            if step.applied and step.flags[2]:
                with timed("snapshots"):
                    self.snapshot(hooks)
            if step.applied and ((every and self.update % every == 0) or step.flags[0]):
                with timed("checkpoints"):
                    self.checkpoint(hooks)
            reason = "max_minutes" if step.flags[1] else self.done()
        with timed("logging"):
            if self.window.tokens:
                hooks.on_log(self, self.log_record())
        if self._last_valid_update != self.update and self.valid_batches:
            self.validate_and_tell(hooks)
        with timed("checkpoints"):
            if self._last_checkpoint[0] != self.update:
                self.checkpoint(hooks)
        with timed("snapshots"):
            if self.cfg.snapshot_every_minutes is not None and self._last_snapshot_update != self.update:
                self.snapshot(hooks, final=True)
        return self.summary(reason)

    def validate_and_tell(self, hooks: Hooks) -> None:
        with self.ledger.part("validation"):
            record = self.validate()
        with self.ledger.part("validation_hooks"):  # MLflow, and the attention maps and translations drawn
            hooks.on_validate(self, record)

    def first_update_done(self, started: float) -> None:
        """Say how long the start-up took (stage start to the first update: Ray, data, model, the epoch's batch
        plan: what grows with the corpus), apart from the first update itself (what grows with the model)."""
        self._first_update = (started - self.cfg.start_time, time.time() - started)
        if self.rank == 0:
            startup, seconds = self._first_update
            print(f"first update started {startup:.1f} s after the stage did, and took {seconds:.1f} s", flush=True)

    def accumulate(self, step: Step) -> None:
        self.window.add(step.applied, step.loss, step.nll, step.tokens, step.grad_norm, step.lr)

    def log_record(self) -> dict:
        """The train row since the last one (token-weighted means), printed on rank 0 as the progress line."""
        record = self.window.row(self.update, self.skipped, self.clock_start)
        self.history["train"].append(record)
        if self.rank == 0:
            per_update = self.tokens / max(self.update, 1)
            print(progress_line(record, per_update, self.cfg.max_updates - self.update, self.deadline()), flush=True)
        return record

    def checkpoint(self, hooks: Hooks) -> None:
        if not self.weights_finite():  # identical weights on every rank, so every rank raises together
            raise NonFiniteTraining(f"non-finite weights at update {self.update}: no checkpoint written")
        metrics = {"update": self.update, "skipped": self.skipped, "tokens": self.tokens, **self.last_metrics()}
        hooks.on_checkpoint(self, self.state_dict() if self.rank == 0 else None, metrics)
        self._last_checkpoint = (self.update, time.time())

    def snapshot(self, hooks: Hooks, final: bool = False) -> None:
        """Weights only, labelled with the latest mark passed (or, `final`, with the time at the end)."""
        elapsed = self.clock()
        every = self.cfg.snapshot_every_minutes
        self._snapshots = max(self._snapshots + (not final), marks_passed(elapsed, every))
        snapshot = None
        if self.rank == 0:
            snapshot = {
                "model": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "config": self.model_cfg.to_dict(),
                "update": self.update,
                "tokens": self.tokens,
                "minutes": elapsed / 60.0 if final else self._snapshots * every,
                "elapsed_minutes": elapsed / 60.0,
            }
        hooks.on_snapshot(self, snapshot)
        self._last_snapshot_update = self.update

    def last_metrics(self) -> dict:
        out = {}
        if self.history["train"]:
            out.update({k: self.history["train"][-1][k] for k in ("loss", "nll", "ppl")})
        if self.history["valid"]:
            out.update({k: v for k, v in self.history["valid"][-1].items() if k != "update"})
        return out

    def summary(self, reason: str | None) -> dict:
        return {
            "updates": self.update,
            "tokens": self.tokens,
            "skipped_updates": self.skipped,
            "epoch": self.position.epoch,
            "stopped_by": reason,
            "startup_s": None if self._first_update is None else round(self._first_update[0], 2),
            "first_update_s": None if self._first_update is None else round(self._first_update[1], 2),
            "time_s": self.ledger.rounded(),  # this worker group's loop (since its start or restart), by part
            **self.last_metrics(),
        }
