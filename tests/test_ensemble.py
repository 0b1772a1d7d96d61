"""Ensembles (fairseq's EnsembleModel): each step averages the members' probabilities; one member is that model,
two copies are one model, and a two-member step is the mean derived by hand."""

import math

import pytest
import torch
from helpers_eval import make_workspace, tiny_model
from helpers_search import copy_batch, copy_model
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tolerance import close

from pipeline.common.translator import Translator
from transformer.beam_search import beam_search
from transformer.ensemble import Ensemble
from transformer.model import make_config
from transformer.search import greedy_search


@pytest.fixture(scope="module")
def model():
    return copy_model(0)


@pytest.fixture(scope="module")
def sources():
    return copy_batch(torch.Generator().manual_seed(1), 12)[0]


def test_an_ensemble_of_one_model_is_that_model(model, sources):
    alone = beam_search(model, sources, beam=4, nbest=2)
    ensemble = beam_search(Ensemble([model]), sources, beam=4, nbest=2)
    assert ensemble == alone  # the same step, bit for bit: tokens, scores and log-probs
    assert greedy_search(Ensemble([model]), sources) == greedy_search(model, sources)


def test_an_ensemble_of_two_copies_is_one_model(model, sources):
    """log((p + p) / 2) = log p: the same hypotheses, scores equal to float32 rounding per token."""
    alone = beam_search(model, sources, beam=4, nbest=2)
    twice = beam_search(Ensemble([model, model]), sources, beam=4, nbest=2)
    for a, b in zip(alone, twice, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        for ha, hb in zip(a, b, strict=True):
            assert close(ha.logprob, hb.logprob, terms=len(ha.tokens) + 1)


class FixedModel(torch.nn.Module):
    """A stand-in member whose every step gives the distribution `probs` over a toy vocabulary."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.cfg = make_config("tiny", len(probs))
        self.log_p = torch.tensor(probs).log()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def encode(self, src):
        return src

    def init_state(self, enc, max_len):
        return {"rows": enc.shape[0]}

    def decode_step(self, tokens, state, log_probs=True):
        return self.log_p.expand(tokens.shape[0], -1).clone()


def test_a_two_member_step_is_the_mean_of_their_probabilities():
    # Vocabulary of 6 (pad, unk, bos, eos, 4, 5). Member A prefers token 4, member B token 5:
    #   A: eos 0.1, 4 0.6, 5 0.3        B: eos 0.1, 4 0.2, 5 0.7
    #   mean: eos 0.1, 4 0.4, 5 0.5  -> the ensemble prefers 5, though A alone would say 4.
    a = FixedModel([0.0, 0.0, 0.0, 0.1, 0.6, 0.3])
    b = FixedModel([0.0, 0.0, 0.0, 0.1, 0.2, 0.7])
    ensemble = Ensemble([a, b])
    step = ensemble.decode_step(torch.tensor([2, 2]), ensemble.init_state(ensemble.encode(torch.zeros(2, 1)), 4))
    expected = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.4, 0.5]).log().expand(2, -1)
    torch.testing.assert_close(step, expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps * math.log(10))
    assert step.argmax(dim=-1).tolist() == [5, 5]
    assert torch.logsumexp(step, dim=-1).abs().max() < 1e-6  # normalised: logits for a search are log-probs


def test_members_must_share_the_vocabulary(model):
    other = tiny_model()  # another vocabulary size
    with pytest.raises(
        ValueError, match=r"b\.pt has vocabulary size .* but a\.pt has .*: ensemble members must share one vocabulary"
    ):
        Ensemble([model, other], names=["a.pt", "b.pt"])


def test_the_translator_ensembles_model_files_and_checks_their_sentencepiece(tmp_path):
    root = tmp_path / "w"
    make_workspace(root, n_test=6)
    from pipeline.average import average
    from pipeline.common.params import AverageParams

    out = root / "models"
    for name, last in (("a.pt", 1), ("b.pt", 3)):
        average(out / "checkpoints", root / "data" / "bpe", out / name, AverageParams(last=last), {})
    one = Translator.from_file(out / "a.pt", device="cpu")
    pair = Translator.from_file([out / "a.pt", out / "b.pt"], device="cpu")
    assert isinstance(pair.model, Ensemble) and not isinstance(one.model, Ensemble)
    assert len(pair.translate(["A dog runs.", "Two men."])) == 2
    # Another sentencepiece model in c.pt (one piece's score changed): refused, naming both files.
    blob = torch.load(out / "b.pt", weights_only=True)
    proto = sp_pb2.ModelProto.FromString(blob["extra"]["bpe"]["model_proto"].numpy().tobytes())
    proto.pieces[10].score += 1.0
    blob["extra"]["bpe"] |= {"model_proto": torch.frombuffer(bytearray(proto.SerializeToString()), dtype=torch.uint8)}
    blob["extra"]["bpe"]["sha256"] = None
    torch.save(blob, out / "c.pt")
    with pytest.raises(ValueError, match=r"c\.pt was trained with another sentencepiece model than .*a\.pt"):
        Translator.from_file([out / "a.pt", out / "c.pt"], device="cpu")
