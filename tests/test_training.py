"""The per-worker loop without Ray: W workers equal 1 worker, resume is exact, non-finite updates are skipped
and counted, and the state loads with `torch.load(weights_only=True)`."""

import io
import math
import time
import types
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from transformer import training
from transformer.batching import PackedCorpus, Position
from transformer.model import EOS_ID, make_config
from transformer.progress import TimeLedger
from transformer.schedule import rate
from transformer.training import Hooks, TooManyBadUpdates, Trainer, TrainingConfig

VOCAB = 40


def tiny_corpus(n=64, seed=0) -> PackedCorpus:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        src = rng.integers(4, VOCAB, rng.integers(2, 10)).tolist() + [EOS_ID]
        pairs.append((src, [(t + 1) % VOCAB or 4 for t in src[:-1]] + [EOS_ID]))
    return PackedCorpus.from_pairs(pairs)


def model_cfg(dropout=0.0, **extra):
    shape = dict(d_model=32, d_ff=64, heads=2, encoder_layers=1, decoder_layers=1)
    return make_config("tiny", VOCAB, **shape, dropout=dropout, **extra)


def train_cfg(**kw):
    base = dict(
        update_tokens=120,
        max_tokens=60,
        max_updates=4,
        warmup=2,
        validate_every_updates=2,
        log_every_updates=1,
        checkpoint_every_updates=2,
        checkpoint_every_minutes=None,
    )
    return TrainingConfig(**{**base, **kw})


class Record(Hooks):
    def __init__(self):
        self.logs, self.valid, self.checkpoints, self.lrs = [], [], [], []

    def on_update(self, trainer, step):
        self.lrs.append(step.lr)

    def on_log(self, trainer, record):
        self.logs.append(record)

    def on_validate(self, trainer, record):
        self.valid.append(record)

    def on_checkpoint(self, trainer, state, metrics):
        buf = io.BytesIO()
        torch.save(state, buf)
        self.checkpoints.append(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))


THREE_MICRO = train_cfg(update_tokens=180, max_updates=3)
DROPOUT = 0.3  # on: the masks of each micro-batch must not depend on the rank that runs it


def _worker(rank, world_size, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    trainer = Trainer(model_cfg(DROPOUT), THREE_MICRO, tiny_corpus(), tiny_corpus(16, 1), wrap=DistributedDataParallel)
    hooks = Record()
    trainer.fit(hooks)
    if rank == 0:
        torch.save(
            {
                "losses": [r["loss"] for r in hooks.logs],
                "valid": hooks.valid[-1]["valid_loss"],
                "model": trainer.module.state_dict(),
            },
            out,
        )
    dist.destroy_process_group()


def test_two_gloo_workers_match_one_worker(tmp_path):
    single = Trainer(model_cfg(DROPOUT), THREE_MICRO, tiny_corpus(), tiny_corpus(16, 1))
    # 1 worker accumulates 3 micro-batches; of 2 workers, rank 0 takes micro-batches 0 and 2 (the first under
    # DDP's no_sync), rank 1 takes micro-batch 1 and a dummy batch of weight 0, so both make 2 backward calls.
    assert single.plan.micro_per_update == 3 and single.plan.accumulation(2) == 2
    assert [single.plan.idle_slots(w) for w in (1, 2, 3)] == [0, 1, 0]
    hooks = Record()
    single.fit(hooks)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2)
    two = torch.load(tmp_path / "out.pt", weights_only=True)
    assert len(two["losses"]) == 3
    np.testing.assert_allclose(two["losses"], [r["loss"] for r in hooks.logs], rtol=1e-5, atol=1e-5)
    assert two["valid"] == pytest.approx(hooks.valid[-1]["valid_loss"], abs=1e-5)
    # Adam moves each weight by up to lr ≈ 0.1 per update here, and divides by √v: where a gradient is tiny (the
    # cross-attention queries of an untrained model), summation-order noise of 1e-7 becomes a ~1e-5 difference
    # (seen on AVX-512 MKL). 1e-4 is 0.1% of one step; the losses above stay compared to 1e-5.
    for k, v in single.module.state_dict().items():
        torch.testing.assert_close(without_key_bias(k, two["model"][k]), without_key_bias(k, v), rtol=0, atol=1e-4)


def without_key_bias(name, t):
    # The key bias has a zero gradient in exact arithmetic (softmax ignores a constant shift of the scores), so
    # Adam turns summation-order noise of ~1e-9 into full-size steps there: compare every other weight.
    if name.endswith("in_proj.bias"):  # [query | key | value]
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d :]])
    if name.endswith("kv_proj.bias"):  # [key | value]
        return t[t.shape[0] // 2 :]
    return t


def test_resuming_on_another_number_of_workers_replays_the_run():
    # Elastic training: a checkpoint written by 2 workers resumed on 1 continues from its data position with the
    # masks the uninterrupted run draws (keyed by micro-batch, not by rank), silently and bit-exactly.
    cfg = train_cfg(max_updates=6, checkpoint_every_updates=3)
    straight = Trainer(model_cfg(0.3), cfg, tiny_corpus(), tiny_corpus(16, 1))
    hooks = Record()
    straight.fit(hooks)
    resumed = Trainer(model_cfg(0.3), cfg, tiny_corpus(), tiny_corpus(16, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict({**hooks.checkpoints[0], "world_size": 2})
    assert resumed.position == Position(**hooks.checkpoints[0]["position"])
    resumed.fit(Record())
    assert resumed.position == straight.position and resumed.update == straight.update == 6
    for k, v in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[k], v), k


def two_copies() -> PackedCorpus:
    """Two versions of 64 pairs back to back, as BPE-dropout's sampled split holds two encodings of them; the
    second has other targets, so an epoch trained on the wrong copy changes the weights."""
    first, second = tiny_corpus(), tiny_corpus(64, 7)
    return PackedCorpus.from_pairs([first[i] for i in range(64)] + [(first[i][0], second[i][1]) for i in range(64)])


@pytest.mark.parametrize(
    "extra, copies",
    [({}, 1), (dict(attention_dropout=0.2, activation_dropout=0.2), 1), ({}, 2)],
    ids=["paper", "attn-act", "bpe-dropout-copies"],
)
def test_resume_from_a_checkpoint_is_bit_exact(extra, copies):
    # Dropout on: exactness needs the reseeding by data position, not only the saved RNG state; the cool-down
    # needs the lr of the first resumed update, which the optimizer state carries. The opt-in attention-weight
    # dropout draws its masks inside scaled_dot_product_attention, from the same reseeded generator. With
    # BPE-dropout's copies the resumed run must also pick the epoch's copy: the run crosses into epoch 2.
    cfg = train_cfg(max_updates=6 if copies == 1 else 12, checkpoint_every_updates=3, cooldown=0.5, train_copies=copies)
    data = tiny_corpus() if copies == 1 else two_copies()
    straight = Trainer(model_cfg(0.3, **extra), cfg, data, tiny_corpus(16, 1))
    hooks = Record()
    straight.fit(hooks)
    assert [c["update"] for c in hooks.checkpoints][:2] == [3, 6]
    if copies > 1:
        assert straight.position.epoch >= 2 and hooks.checkpoints[0]["position"]["epoch"] == 1
        assert min(int(m.min()) for g in straight.plan.epoch(2) for m in g) == 64  # epoch 2: the second copy
    resumed = Trainer(model_cfg(0.3, **extra), cfg, data, tiny_corpus(16, 1))
    resumed.load_state_dict(hooks.checkpoints[0])
    summary = resumed.fit(Record())
    assert summary["updates"] == cfg.max_updates
    for k, v in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[k], v), k
    assert resumed.history["train"][-1]["loss"] == straight.history["train"][-1]["loss"]


def test_checkpoint_state_is_complete():
    hooks = Record()
    Trainer(model_cfg(), train_cfg(max_updates=2), tiny_corpus(), tiny_corpus(16, 1)).fit(hooks)
    state = hooks.checkpoints[-1]
    assert {"model", "config", "update", "optimizer", "scheduler", "position", "rng", "history"} <= set(state)
    assert state["update"] == 2 and state["scheduler"]["last_epoch"] == 2
    assert state["config"]["vocab_size"] == VOCAB


def test_logs_validation_and_loss_normalisation():
    trainer = Trainer(model_cfg(), train_cfg(), tiny_corpus(), tiny_corpus(16, 1))
    hooks = Record()
    summary = trainer.fit(hooks)
    assert [r["update"] for r in hooks.logs] == [1, 2, 3, 4]
    assert [r["update"] for r in hooks.valid] == [2, 4]
    # Fresh model: per-token loss near log(V) (uniform prediction), perplexity = exp(nll).
    assert abs(hooks.logs[0]["loss"] - math.log(VOCAB)) < 1.0
    assert hooks.valid[-1]["valid_ppl"] == pytest.approx(math.exp(hooks.valid[-1]["valid_nll"]))
    assert summary["updates"] == 4 and summary["tokens"] > 0 and summary["skipped_updates"] == 0


class NanAt:
    """Forward hook that poisons the logits of chosen forward calls."""

    def __init__(self, calls):
        self.calls, self.n = set(calls), 0

    def __call__(self, module, args, output):
        self.n += 1
        return output * float("nan") if self.n in self.calls else output


def test_non_finite_loss_is_skipped_and_counted():
    trainer = Trainer(model_cfg(), train_cfg(max_updates=3, validate_every_updates=100), tiny_corpus(), None)
    trainer.module.register_forward_hook(NanAt({3, 4}))  # the second update (2 micro-batches each)
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    summary = trainer.fit(Record())
    assert summary["skipped_updates"] == 1 and summary["updates"] == 3
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())
    assert any(not torch.equal(before[k], v) for k, v in trainer.module.state_dict().items())


def test_too_many_bad_updates_raise():
    trainer = Trainer(model_cfg(), train_cfg(max_bad_updates=2), tiny_corpus(), None)
    trainer.module.register_forward_hook(NanAt(range(1, 100)))
    with pytest.raises(TooManyBadUpdates, match="2 consecutive updates"):
        trainer.fit(Record())


def test_gradient_clipping_scales_the_gradient_to_clip_norm():
    seen = []
    trainer = Trainer(model_cfg(), train_cfg(max_updates=1, clip_norm=1e-3), tiny_corpus(), None)
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            torch.nn.utils.get_total_norm([p.grad for p in trainer.module.parameters()])
        )
    )
    step = trainer.train_step(trainer.plan.epoch(1)[0])
    assert step.grad_norm > 1e-3  # the norm reported is the one before clipping
    assert float(seen[0]) == pytest.approx(1e-3, rel=1e-3)


def test_deadline_stops_and_checkpoints():
    import time

    hooks = Record()
    cfg = train_cfg(max_updates=1000, deadline=time.time() - 1, checkpoint_every_updates=500)
    summary = Trainer(model_cfg(), cfg, tiny_corpus(), None).fit(hooks)
    assert summary["updates"] == 1 and summary["stopped_by"] == "max_minutes"
    assert [c["update"] for c in hooks.checkpoints] == [1]


def test_cooldown_takes_the_lr_linearly_to_zero_over_the_last_updates():
    hooks = Record()
    Trainer(model_cfg(), train_cfg(max_updates=8, cooldown=0.5), tiny_corpus(), None).fit(hooks)
    # Update n runs at rate(n) times (1 - (n - 1) / 8) / 0.5, capped at 1: full for n <= 5, then 3/4, 1/2, 1/4.
    multiplier = [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    expected = [rate(n, 32, 2) * m for n, m in zip(range(1, 9), multiplier, strict=True)]
    assert hooks.lrs == pytest.approx(expected, rel=1e-12)


def test_cooldown_follows_the_wall_clock_budget():
    # Half of a 200-second budget spent before the first update: with cool-down 1 the lr is about half the
    # paper's; the update budget (3 of 1,000 updates) plays no part.
    now = time.time()
    cfg = train_cfg(max_updates=1000, cooldown=1.0, start_time=now - 100, deadline=now + 100)
    hooks = Record()
    trainer = Trainer(model_cfg(), cfg, tiny_corpus(), None)
    for _ in range(3):
        hooks.on_update(trainer, trainer.train_step(trainer.plan.epoch(0)[trainer.position.index]))
    for n, lr in zip((2, 3), hooks.lrs[1:], strict=True):
        assert 0.45 * rate(n, 32, 2) < lr <= 0.5 * rate(n, 32, 2)


def test_summary_times_the_start_up_and_the_first_update(capsys):
    start = time.time() - 5.0  # as if the stage had started 5 s before the Trainer was built
    summary = Trainer(model_cfg(), train_cfg(max_updates=2, start_time=start), tiny_corpus(), None).fit(Record())
    assert 5.0 <= summary["startup_s"] < 5.0 + (time.time() - start - 5.0)
    assert 0 < summary["first_update_s"] <= time.time() - start - summary["startup_s"]
    assert "first update started" in capsys.readouterr().out


class FakeClock(Record):
    """Stands in for `time` inside transformer.training: each update takes `per_update` seconds from `now`."""

    def __init__(self, now: float, per_update: float):
        super().__init__()
        self.now, self.per_update = now, per_update

    def time(self) -> float:
        return self.now

    def on_update(self, trainer, step):
        super().on_update(trainer, step)
        self.now += self.per_update


def test_a_resumed_run_spends_the_rest_of_its_time_budget_and_cools_down_as_if_never_stopped(monkeypatch):
    # 30 s an update, a 300 s budget cooled down over its second half. Straight: the clock reads 300 s before
    # update 11, which still runs. Killed after the checkpoint at update 4 (clock 120 s), the rerun's stage
    # starts at 5,000 s and its workers at 5,040 s: it must spend the 180 s left, not a fresh 300 s from its own
    # start (the clock used to start again), with the straight run's lr at every update.
    cfg = dict(max_updates=1000, cooldown=0.5, checkpoint_every_updates=4, validate_every_updates=100)
    straight = FakeClock(now=0.0, per_update=30.0)
    monkeypatch.setattr(training, "time", types.SimpleNamespace(time=straight.time))
    Trainer(model_cfg(0.3), train_cfg(**cfg, start_time=0.0, deadline=300.0), tiny_corpus(), None).fit(straight)
    assert straight.checkpoints[-1]["update"] == 11 and straight.checkpoints[-1]["elapsed_s"] == 330.0

    rerun = FakeClock(now=5040.0, per_update=30.0)
    monkeypatch.setattr(training, "time", types.SimpleNamespace(time=rerun.time))
    trainer = Trainer(model_cfg(0.3), train_cfg(**cfg, start_time=5000.0, deadline=5300.0), tiny_corpus(), None)
    trainer.load_state_dict(straight.checkpoints[0])
    assert trainer.clock() == 120.0
    summary = trainer.fit(rerun)
    assert summary["updates"] == 11 and summary["stopped_by"] == "max_minutes"
    assert rerun.lrs == straight.lrs[4:]
    # Update n runs at rate(n) times the cool-down of the clock read before update n - 1: 30 (n - 2) / 300 spent.
    multiplier = [1, 1, 1, 0.8, 0.6, 0.4, 0.2]
    expected = [rate(n, 32, 2) * m for n, m in zip(range(5, 12), multiplier, strict=True)]
    assert rerun.lrs == pytest.approx(expected, rel=1e-6)  # the clock's share is reduced in float32
    assert [c["elapsed_s"] for c in rerun.checkpoints] == [c["elapsed_s"] for c in straight.checkpoints[1:]]
    assert all(torch.equal(trainer.module.state_dict()[k], v) for k, v in straight.checkpoints[-1]["model"].items())


class Slow(Hooks):
    """Hooks that take known time: each checkpoint 0.5 s, each validation hook 0.1 s."""

    def on_checkpoint(self, trainer, state, metrics):
        time.sleep(0.5)

    def on_validate(self, trainer, record):
        time.sleep(0.1)


def test_the_time_ledger_puts_each_part_of_the_loop_in_its_place():
    # 4 updates, a checkpoint and a validation every 2: 2 checkpoints (1 s) and 2 validations (0.2 s) in hooks; the
    # slack is under 0.2 s, so a validation hook counted as a checkpoint (or the reverse) fails.
    started = time.perf_counter()
    trainer = Trainer(model_cfg(), train_cfg(), tiny_corpus(), tiny_corpus(16, 1))
    summary = trainer.fit(Slow())
    loop = time.perf_counter() - started
    t = summary["time_s"]
    assert set(t) == set(TimeLedger.PARTS)
    assert 1.0 <= t["checkpoints"] < 1.0 + 0.15 and 0.2 <= t["validation_hooks"] < 0.2 + 0.15
    # Unrounded: validating 16 tiny pairs takes a few ms, 0.0 once rounded to 0.01 s on a fast CPU with one thread.
    raw = trainer.ledger.seconds
    assert raw["first_update"] > 0 and raw["steps"] > 0 and raw["validation"] > 0  # 3 steps after the first
    assert sum(t.values()) <= loop + 0.05  # rounded to 0.01 s per part
