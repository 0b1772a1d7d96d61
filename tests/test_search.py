"""Greedy and beam search: invariants that hold for any weights, checked on tiny models on CPU.

Most tests use a tiny model trained for a few seconds to copy its source (so that it ends hypotheses with eos
at varied lengths, as real models do, and beam search has real choices to make); none compares with numbers
recorded from a run.
"""

import itertools
import math

import pytest
import torch
from helpers_search import V, copy_batch, copy_model, sequence_logprob, strip
from tolerance import at_least, close

from transformer.beam_search import Hypothesis, beam_search, penalty_table
from transformer.model import BOS_ID, EOS_ID, PAD_ID, Transformer, make_config
from transformer.search import greedy_search, max_output_lengths


@pytest.fixture(scope="module")
def model() -> Transformer:
    return copy_model(0)


@pytest.fixture(scope="module")
def sources() -> torch.Tensor:
    return copy_batch(torch.Generator().manual_seed(1), 12)[0]


def gnmt(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


def test_trained_fixture_ends_hypotheses_at_varied_lengths(model, sources):
    lengths = {len(h) for h in greedy_search(model, sources)}
    assert len(lengths) >= 3  # else the tests below would only see the maximum-length path


def test_beam_one_is_greedy(model, sources):
    greedy = greedy_search(model, sources, max_len_a=1.0, max_len_b=3)
    beam = beam_search(model, sources, beam=1, max_len_a=1.0, max_len_b=3, stop="k_finished")
    assert [h[0].tokens for h in beam] == greedy


def test_greedy_batch_equals_alone(model, sources):
    batch = greedy_search(model, sources)
    assert batch == [greedy_search(model, strip(s))[0] for s in sources]


@pytest.mark.parametrize("stop", ["bound", "k_finished"])
def test_padded_batch_equals_each_sentence_alone(model, sources, stop):
    batch = beam_search(model, sources, beam=4, nbest=4, stop=stop)
    for src, hyps in zip(sources, batch, strict=True):
        alone = beam_search(model, strip(src), beam=4, nbest=4, stop=stop)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        # The same hypotheses, their log-probs summed over other batch layouts: a float32 sum per token.
        for h, a in zip(hyps, alone, strict=True):
            assert close(h.score, a.score, terms=len(h.tokens) + 1), (h, a)


@pytest.mark.parametrize("length_penalty", ["gnmt", "hf"])
def test_scores_equal_full_sequence_rescoring(model, sources, length_penalty):
    alpha = 0.6
    results = beam_search(model, sources, beam=4, nbest=4, alpha=alpha, length_penalty=length_penalty)
    for src, hyps in zip(sources, results, strict=True):
        assert len(hyps) == 4
        for h in hyps:
            rescored = sequence_logprob(model, strip(src), h.tokens)
            assert close(h.logprob, rescored, terms=len(h.tokens) + 1), (h, rescored)
            L = len(h.tokens) + 1  # |Y| counts the eos
            lp = gnmt(L, alpha) if length_penalty == "gnmt" else L**alpha
            assert h.score == pytest.approx(h.logprob / lp, rel=1e-6)


def test_nbest_sorted_distinct_and_within_max_length(model, sources):
    a, b = 0.5, 2
    limits = max_output_lengths(sources, a, b, model.cfg.max_positions)
    for stop in ("bound", "k_finished"):
        results = beam_search(model, sources, beam=5, nbest=5, max_len_a=a, max_len_b=b, stop=stop)
        for hyps, limit in zip(results, limits, strict=True):
            scores = [h.score for h in hyps]
            assert scores == sorted(scores, reverse=True)
            assert len({tuple(h.tokens) for h in hyps}) == len(hyps)
            assert all(len(h.tokens) <= limit for h in hyps)
            assert all(t not in (PAD_ID, BOS_ID, EOS_ID) for h in hyps for t in h.tokens)


def test_max_output_length_formula():
    src = torch.tensor([[5, 6, 7, EOS_ID, PAD_ID], [5, 6, 7, 8, EOS_ID]])
    assert max_output_lengths(src, 1.5, 2, 1024) == [math.floor(1.5 * 4) + 2, math.floor(1.5 * 5) + 2]
    assert max_output_lengths(src, 1.0, 50, 20) == [19, 19]  # bos + tokens must fit max_positions


def test_zero_max_length_gives_the_empty_hypothesis_scored_by_its_eos(model, sources):
    results = beam_search(model, sources[:3], beam=4, nbest=1, max_len_a=0.0, max_len_b=0)
    for src, (h,) in zip(sources[:3], results, strict=True):
        assert h.tokens == []
        assert close(h.logprob, sequence_logprob(model, strip(src), []))
        assert h.score == pytest.approx(h.logprob / gnmt(1, 0.6), rel=1e-6)
    assert greedy_search(model, sources[:3], max_len_a=0.0, max_len_b=0) == [[], [], []]


def test_empty_batch_gives_no_results(model, sources):
    empty = sources[:0]  # (0, S): e.g. the last shard of a split smaller than the number of workers
    assert greedy_search(model, empty) == []
    assert beam_search(model, empty, beam=4) == []


def test_model_that_prefers_eos_first_returns_the_empty_hypothesis():
    torch.manual_seed(0)
    m = Transformer(make_config("tiny", V, dropout=0.0)).eval()
    with torch.no_grad():  # every decoder output leans towards the eos embedding
        e = m.embed.weight[EOS_ID]
        m.decoder[-1].norm3.bias += 20 * e / e.dot(e)
    src = copy_batch(torch.Generator().manual_seed(2), 4)[0]
    assert greedy_search(m, src) == [[]] * 4
    for stop in ("bound", "k_finished"):
        assert all(h[0].tokens == [] for h in beam_search(m, src, beam=4, stop=stop))


@pytest.mark.parametrize("favoured", [PAD_ID, BOS_ID])
def test_pad_and_bos_are_never_generated_even_when_most_probable(favoured):
    torch.manual_seed(0)
    m = Transformer(make_config("tiny", V, dropout=0.0)).eval()
    with torch.no_grad():
        e = torch.randn(m.cfg.d_model) if favoured == PAD_ID else m.embed.weight[favoured].clone()
        m.embed.weight[favoured] = e  # pad's row is zero (its logit always 0): give it one to lean on
        m.decoder[-1].norm3.bias += 20 * e / e.dot(e)
    src = copy_batch(torch.Generator().manual_seed(2), 4)[0]
    outputs = greedy_search(m, src, max_len_b=4) + [h.tokens for r in beam_search(m, src, nbest=4) for h in r]
    assert all(favoured not in y for y in outputs)


def exhaustive_best(model, src, vocab, max_len, alpha) -> tuple[list[int], float]:
    """Every output of at most max_len tokens from `vocab`, scored by teacher forcing; the best one."""
    outputs = [list(y) for n in range(max_len + 1) for y in itertools.product(vocab, repeat=n)]
    scored = [(sequence_logprob(model, src, y) / gnmt(len(y) + 1, alpha), y) for y in outputs]
    score, best = max(scored)
    return best, score


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_finds_the_exhaustive_optimum_and_beats_greedy(seed):
    """Vocabulary {unk, eos, 4, 5} (pad and bos are never generated), outputs of at most 3 tokens: 40 of them;
    a beam of 64 never prunes, so beam search is exhaustive search."""
    torch.manual_seed(seed)
    m = Transformer(make_config("tiny", 6, dropout=0.0)).eval()
    src = torch.tensor([[4, 5, 4, EOS_ID]])
    alpha, limit = 0.6, dict(max_len_a=0.0, max_len_b=3)
    best, best_score = exhaustive_best(m, src, [1, 4, 5], 3, alpha)
    for stop in ("bound", "k_finished"):
        (top,) = beam_search(m, src, beam=64, alpha=alpha, stop=stop, **limit)[0]
        assert top.tokens == best and close(top.score, best_score, terms=4)
    (greedy,) = greedy_search(m, src, **limit)
    greedy_score = sequence_logprob(m, src, greedy) / gnmt(len(greedy) + 1, alpha)
    beam4 = beam_search(m, src, beam=4, alpha=alpha, **limit)[0][0]
    # Not a theorem for every model (a beam can prune the greedy path), but it holds for these.
    assert at_least(best_score, beam4.score, terms=4) and at_least(beam4.score, greedy_score, terms=4)


def test_bound_stop_never_worse_than_k_finished(model, sources):
    """Both follow the same live beams (which never depend on the finished ones); 'bound' stops only when no
    live hypothesis can beat its best finished one, so its best is at least as good."""
    for alpha in (0.0, 0.6, 1.5):
        bound = beam_search(model, sources, beam=3, alpha=alpha, stop="bound")
        k_fin = beam_search(model, sources, beam=3, alpha=alpha, stop="k_finished")
        for b, k in zip(bound, k_fin, strict=True):
            # Equal hypotheses may be scored through other batch layouts: float32 sums in another order.
            assert at_least(b[0].score, k[0].score, terms=len(b[0].tokens) + 1), (alpha, b[0], k[0])


def test_incremental_decoding_with_reordering_equals_full_decoding(model, sources):
    """Widen to 2 rows per sentence, permute rows within sentences, drop a sentence: every row's next
    log-probs stay those of a full teacher-forced pass over its own prefix."""
    sentence = torch.tensor([0, 0, 1, 1, 2, 2])  # six prefixes, two per source sentence
    tgt = torch.randint(4, V, (6, 5), generator=torch.Generator().manual_seed(3))
    tgt_in = torch.cat([torch.full((6, 1), BOS_ID), tgt], dim=1)  # (6, 6)
    with torch.inference_mode():
        full = torch.log_softmax(model(sources[sentence], tgt_in), dim=-1)  # (6, 6, V)
        state = model.init_state(model.encode(sources[:3]), 8)
        torch.testing.assert_close(model.decode_step(tgt_in[::2, 0], state), full[::2, 0])
        state = model.reorder_state(state, torch.tensor([0, 0, 1, 1, 2, 2]), beam=2)
        rows = torch.arange(6)  # which prefix each state row holds
        for t, (order, within) in enumerate(
            [
                (torch.tensor([1, 0, 2, 3, 5, 4]), True),
                (torch.tensor([1, 0, 3, 2, 4, 5]), True),
                (torch.tensor([4, 5, 0, 1]), False),
                (torch.tensor([1, 0, 2, 3]), True),
            ],
            start=1,
        ):
            torch.testing.assert_close(model.decode_step(tgt_in[rows, t], state), full[rows, t])
            state = model.reorder_state(state, order, within_sentences=within)
            rows = rows[order]


def test_penalty_table():
    lp = penalty_table("gnmt", 0.6, 4, torch.device("cpu"))
    assert lp.tolist() == pytest.approx([gnmt(n, 0.6) for n in range(5)])
    assert penalty_table("hf", 1.0, 3, torch.device("cpu")).tolist() == [1.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beam=0), "beam"),
        (dict(beam=2, nbest=3), "nbest"),
        (dict(length_penalty="wu"), "length_penalty"),
        (dict(stop="never"), "stop"),
    ],
)
def test_bad_arguments_are_named(model, sources, kwargs, message):
    with pytest.raises(ValueError, match=message):
        beam_search(model, sources, **kwargs)


def test_hypothesis_is_a_named_tuple():
    h = Hypothesis([5, 6], -1.0, -2.0)
    assert (h.tokens, h.score, h.logprob) == ([5, 6], -1.0, -2.0)
