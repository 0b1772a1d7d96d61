"""The exponential moving average of the weights (train.ema_decay): values derived by hand, the trainer keeps it
after every applied update, it resumes bit for bit, it leaves training unchanged, and the average stage uses it."""

import pytest
import torch
from test_training import Record, model_cfg, tiny_corpus, train_cfg
from torch import nn

from transformer.ema import WeightAverage, averaged_weights
from transformer.training import Trainer


def set_weights(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_bias_corrected_average_by_hand():
    # decay 1/2, weights 1 then 3 then 5:
    #   s1 = 1/2 · 1                 = 0.5,   corrected 0.5 / (1 - 1/2)   = 1
    #   s2 = 1/2 · 0.5  + 1/2 · 3    = 1.75,  corrected 1.75 / (1 - 1/4) = 7/3   = (1·1 + 2·3) / 3
    #   s3 = 1/2 · 1.75 + 1/2 · 5    = 3.375, corrected 3.375 / (1 - 1/8) = 27/7 = (1·1 + 2·3 + 4·5) / 7
    module = nn.Linear(2, 3)
    ema = WeightAverage(module, 0.5)
    expected = []
    for value, corrected in ((1.0, 1.0), (3.0, 7 / 3), (5.0, 27 / 7)):
        set_weights(module, value)
        ema.update()
        expected.append(corrected)
        weights = ema.weights()
        assert set(weights) == {"weight", "bias"}
        for w in weights.values():
            torch.testing.assert_close(w, torch.full_like(w, corrected), rtol=1e-6, atol=0)
    assert ema.count == 3
    state = ema.state_dict()
    assert state["shadow"]["bias"][0].item() == pytest.approx(3.375)
    # The saved state alone gives the same weights (what the train stage writes for the average stage).
    for k, v in averaged_weights(state, module.state_dict()).items():
        assert torch.equal(v, ema.weights()[k])


def test_saved_state_restores_and_checks_its_decay():
    module = nn.Linear(2, 2)
    ema = WeightAverage(module, 0.9)
    ema.update()
    other = WeightAverage(module, 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.count == 1 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow, strict=True))
    with pytest.raises(ValueError, match="decay 0.9 differs from 0.5"):
        WeightAverage(module, 0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="no update yet"):
        WeightAverage(module, 0.5).weights()
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(module, 1.0)


class Weights(Record):
    """Every parameter after each applied update."""

    def __init__(self):
        super().__init__()
        self.after = []

    def on_update(self, trainer, step):
        super().on_update(trainer, step)
        if step.applied:
            self.after.append({k: v.detach().clone() for k, v in trainer.module.named_parameters()})


def test_trainer_averages_every_applied_update_with_weights_decay_to_the_n_minus_i():
    decay = 0.6
    trainer = Trainer(model_cfg(0.1), train_cfg(max_updates=4, ema_decay=decay), tiny_corpus(), tiny_corpus(16, 1))
    hooks = Weights()
    trainer.fit(hooks)
    n = len(hooks.after)
    assert n == 4 and trainer.ema.count == 4
    coefficients = [decay ** (n - i) for i in range(1, n + 1)]  # θ_1 … θ_n
    total = sum(coefficients)
    weights = trainer.ema.weights()
    for name, _ in trainer.module.named_parameters():
        expected = sum(c * w[name] for c, w in zip(coefficients, hooks.after, strict=True)) / total
        torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=1e-6)
    # The checkpoint carries it: state, count and decay.
    state = hooks.checkpoints[-1]["ema"]
    assert (state["count"], state["decay"]) == (4, decay)


def test_the_average_does_not_change_training():
    plain = Trainer(model_cfg(0.3), train_cfg(), tiny_corpus(), tiny_corpus(16, 1))
    plain.fit(Record())
    with_ema = Trainer(model_cfg(0.3), train_cfg(ema_decay=0.9), tiny_corpus(), tiny_corpus(16, 1))
    with_ema.fit(Record())
    for k, v in plain.module.state_dict().items():
        assert torch.equal(with_ema.module.state_dict()[k], v), k


def test_resume_restores_the_average_bit_exact():
    cfg = train_cfg(max_updates=6, checkpoint_every_updates=3, cooldown=0.5, ema_decay=0.8)
    straight = Trainer(model_cfg(0.3), cfg, tiny_corpus(), tiny_corpus(16, 1))
    hooks = Record()
    straight.fit(hooks)
    assert [c["update"] for c in hooks.checkpoints] == [3, 6] and hooks.checkpoints[0]["ema"]["count"] == 3
    resumed = Trainer(model_cfg(0.3), cfg, tiny_corpus(), tiny_corpus(16, 1))
    resumed.load_state_dict(hooks.checkpoints[0])
    resumed.fit(Record())
    assert resumed.ema.count == 6
    for k, v in straight.ema.weights().items():
        assert torch.equal(resumed.ema.weights()[k], v), k
    # A checkpoint without an average cannot resume a run that keeps one.
    plain = Trainer(model_cfg(0.3), train_cfg(), tiny_corpus(), tiny_corpus(16, 1))
    with pytest.raises(ValueError, match="train.ema_decay"):
        Trainer(model_cfg(0.3), cfg, tiny_corpus(), tiny_corpus(16, 1)).load_state_dict(plain.state_dict())


def test_the_train_stage_writes_the_moving_average_beside_the_weights(tmp_path):
    from pipeline.train import write_checkpoints
    from transformer.checkpoint import load

    trainer = Trainer(model_cfg(), train_cfg(max_updates=2, ema_decay=0.5), tiny_corpus(), None)
    hooks = Record()
    trainer.fit(hooks)
    found = [(state, f"update {state['update']}") for state in reversed(hooks.checkpoints)]  # newest first
    assert write_checkpoints(found, 10, 2, tmp_path / "out") == [2]
    blob = load(tmp_path / "out" / "checkpoint_00000002.pt")
    assert set(blob["ema"]) == set(blob["model"])
    for k, v in trainer.ema.weights().items():
        assert torch.equal(blob["ema"][k], v), k
