"""The CTranslate2 engine (pipeline/common/ct2_convert.py, ct2_engine.py) against our torch search, on a tiny
model taught to copy.

The model is trained for a few seconds (as in test_search.py) so that hypotheses end with eos at varied lengths
and beam search has real choices; then pad and bos are made improbable (below 1e-9), as they are in any trained
model, because CTranslate2 normalises its log-probs without them and ours with them (see the engine's docstring):
with them silenced the two searches see the same numbers and must agree token for token.

Tolerances follow float32: CTranslate2 and torch sum the same products in different orders (and use different
kernels on AVX2 and AVX-512 CPUs), so log-probs agree to about 1e-6 relative; we allow 1e-4 · max(1, |x|).
"""

import copy
import json
import math
import random

import ctranslate2
import pytest
import torch
import torch.nn.functional as F

from bench.ct2_calls import CallCounter
from pipeline.common.ct2_convert import META_FILE, convert, placeholder_tokens
from pipeline.common.ct2_engine import (
    CT2Translator,
    batch_sentences,
    check_compute_type,
    ct2_length_penalty,
    parallel_batches,
)
from transformer.beam_search import beam_search
from transformer.checkpoint import save_model
from transformer.model import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Transformer, make_config

V = 24
LIMIT = dict(max_len_a=1.0, max_len_b=10)  # at most 19 output tokens: a repeating hypothesis stops soon


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch and CTranslate2 on one thread in this module: on a shared 2-core machine two threads spin-wait on
    models this small (minutes instead of seconds). Results do not depend on it: every comparison has a float32
    tolerance, and test_threads_do_not_change_results runs CTranslate2 on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b))


def copy_batch(gen: torch.Generator, n: int) -> torch.Tensor:
    """Sources of 2..8 random tokens + eos, padded (the copy task's targets are the sources)."""
    lengths = torch.randint(2, 9, (n,), generator=gen)
    src = torch.full((n, 9), PAD_ID)
    for i, length in enumerate(lengths.tolist()):
        src[i, :length] = torch.randint(4, V, (length,), generator=gen)
        src[i, length] = EOS_ID
    return src


def silence_pad_and_bos(m: Transformer) -> None:
    """Push the logits of pad and bos down by ~30 and leave every other logit as it was: a direction u
    orthogonal to the output embeddings of all other tokens is added to the last decoder output (its final
    LayerNorm bias), pad's embedding row becomes -u (pad rows are only ever masked inputs) and u is signed so
    that bos's row (the decoder's first input, left unchanged) has a negative projection on it."""
    with torch.no_grad():
        E = m.embed.weight
        others = torch.tensor([i for i in range(V) if i not in (PAD_ID, BOS_ID)])
        q, _ = torch.linalg.qr(E[others].T)  # (d, V-2): an orthonormal basis of the other tokens' rows
        w = E[BOS_ID] - q @ (q.T @ E[BOS_ID])  # bos's row, outside that span
        u = -w / w.norm()
        m.decoder[-1].norm3.bias += (30.0 / w.norm().clamp(max=1.0)) * u
        E[PAD_ID] = -u


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """Half-taught to copy: it ends hypotheses near the source length, not always right."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    m = Transformer(make_config("tiny", V, dropout=0.0, max_positions=64))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(60):  # a few seconds
        src = copy_batch(gen, 32)
        tgt_in = torch.cat([torch.full((32, 1), BOS_ID), src[:, :-1]], dim=1)
        loss = F.cross_entropy(m(src, tgt_in).transpose(1, 2), src, ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def model(trained) -> Transformer:
    m = copy.deepcopy(trained)
    silence_pad_and_bos(m)
    return m


@pytest.fixture(scope="module")
def sources() -> list[list[int]]:
    src = copy_batch(torch.Generator().manual_seed(1), 24)
    return [s[s.ne(PAD_ID)].tolist() for s in src]


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ct2") / "model.pt"
    save_model(path, model)
    return path


@pytest.fixture(scope="module")
def ct2_dir(model_file):
    out = model_file.parent / "ct2"
    convert(model_file, out)
    return out


@pytest.fixture(scope="module")
def translator(ct2_dir) -> CT2Translator:
    return CT2Translator(ct2_dir, device="cpu", compute_type="float32", threads=1)


def pad(sources: list[list[int]]) -> torch.Tensor:
    src = torch.full((len(sources), max(map(len, sources))), PAD_ID)
    for i, s in enumerate(sources):
        src[i, : len(s)] = torch.tensor(s)
    return src


def sequence_logprob(model: Transformer, src: list[int], tokens: list[int]) -> float:
    """log P(tokens + eos | src) by one teacher-forced pass (float64 softmax over the whole vocabulary)."""
    tgt = torch.tensor([[*tokens, EOS_ID]])
    tgt_in = torch.cat([torch.tensor([[BOS_ID]]), tgt[:, :-1]], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([src]), tgt_in).double(), dim=-1)
    return logp.gather(2, tgt[:, :, None]).sum().item()


def test_fixture_ends_at_varied_lengths_and_never_wants_pad_or_bos(model, sources):
    lengths = [len(h[0].tokens) for h in beam_search(model, pad(sources), beam=4, **LIMIT)]
    ended = [n < len(s) + LIMIT["max_len_b"] for n, s in zip(lengths, sources, strict=True)]  # before the limit
    assert len(set(lengths)) >= 3 and sum(ended) >= 0.75 * len(lengths)
    src = pad(sources)
    with torch.no_grad():
        p = model(src, torch.cat([torch.full((len(sources), 1), BOS_ID), src[:, :-1]], dim=1)).softmax(-1)
    assert (p[..., PAD_ID] + p[..., BOS_ID]).max() < 1e-9


def test_converted_model_gives_our_log_probs(model, sources, translator):
    """Teacher-forced log-probs of random targets (CTranslate2's score_batch, normalised over the whole
    vocabulary as ours): checks every weight, the position table, the embedding scale and the vocabulary."""
    gen = torch.Generator().manual_seed(2)
    targets = [torch.randint(1, V, (int(n),), generator=gen).tolist() for n in torch.randint(0, 10, (len(sources),))]
    scored = translator.translator.score_batch(
        [[translator.tokens[i] for i in s] for s in sources], [[translator.tokens[i] for i in t] for t in targets]
    )
    for src, tgt, result in zip(sources, targets, scored, strict=True):
        full = torch.tensor([[*tgt, EOS_ID]])
        tgt_in = torch.cat([torch.tensor([[BOS_ID]]), full[:, :-1]], dim=1)
        with torch.no_grad():
            ours = torch.log_softmax(model(torch.tensor([src]), tgt_in), dim=-1)[0].gather(1, full.T)[:, 0]
        assert result.tokens == [translator.tokens[i] for i in [*tgt, EOS_ID]]
        assert all(close(a, b) for a, b in zip(result.log_probs, ours.tolist(), strict=True))


def test_model_folder_holds_our_vocabulary_and_special_tokens(ct2_dir):
    config = json.loads((ct2_dir / "config.json").read_text())
    vocab = json.loads((ct2_dir / "shared_vocabulary.json").read_text())
    assert vocab == placeholder_tokens(V) and vocab[4] == "<id_4>"
    specials = config["bos_token"], config["eos_token"], config["unk_token"]
    assert specials == (vocab[BOS_ID], vocab[EOS_ID], vocab[UNK_ID])
    assert config["decoder_start_token"] == vocab[BOS_ID]
    assert not config["add_source_bos"] and not config["add_source_eos"]
    assert json.loads((ct2_dir / META_FILE).read_text())["max_positions"] == 64
    assert [p.name for p in ct2_dir.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("length_penalty, alpha", [("gnmt", 0.6), ("gnmt", 1.5), ("hf", 0.6), ("gnmt", 0.0)])
def test_same_tokens_and_log_probs_as_torch_search(model, sources, translator, beam, length_penalty, alpha):
    """CTranslate2 stops once beam hypotheses have finished: our stop="k_finished" (module docstring)."""
    options = dict(beam=beam, alpha=alpha, length_penalty=length_penalty, **LIMIT)
    ours = beam_search(model, pad(sources), stop="k_finished", **options)
    theirs = translator.search(sources, **options)
    for src, o, t in zip(sources, ours, theirs, strict=True):
        if t[0].tokens != o[0].tokens:  # only a tie may decide differently (float32 sums in other orders)
            assert close(sequence_logprob(model, src, t[0].tokens), sequence_logprob(model, src, o[0].tokens))
        assert close(t[0].logprob, o[0].logprob) and close(t[0].score, o[0].score)


def test_log_probs_exclude_pad_and_bos_unless_rescored(trained, sources, tmp_path):
    """The documented difference, on the model before pad and bos were silenced (P(pad) + P(bos) up to ~2%):
    CTranslate2 normalises each step without them, so its log-prob of a greedy output (the same tokens: the
    argmax does not change) is ours minus Σ_t log(1 − P_t(pad) − P_t(bos)); `rescore` gives ours."""
    save_model(tmp_path / "model.pt", trained)
    convert(tmp_path / "model.pt", tmp_path / "ct2")
    translator = CT2Translator(tmp_path / "ct2", compute_type="float32", threads=1)
    greedy = beam_search(trained, pad(sources), beam=1, stop="k_finished", **LIMIT)
    plain = translator.search(sources, beam=1, **LIMIT)
    rescored = translator.search(sources, beam=1, rescore=True, **LIMIT)
    for src, (o,), (t,), (r,) in zip(sources, greedy, plain, rescored, strict=True):
        assert t.tokens == o.tokens == r.tokens
        tgt_in = torch.tensor([[BOS_ID, *o.tokens]])
        with torch.no_grad():
            p = torch.softmax(trained(torch.tensor([src]), tgt_in).double(), dim=-1)[0]
        missing = torch.log1p(-p[:, PAD_ID] - p[:, BOS_ID]).sum().item()
        assert missing < -1e-3
        if len(o.tokens) == len(src) + LIMIT["max_len_b"]:  # cut at the limit: re-scored with the eos, as ours
            missing = 0.0
        assert close(t.logprob, o.logprob - missing) and close(r.logprob, o.logprob)


@pytest.mark.parametrize("inter_threads, max_batch_size", [(0, 0), (1, 0), (2, 3), (2, 1)])
def test_threads_and_batches_do_not_change_results(model, sources, translator, inter_threads, max_batch_size):
    """Two threads, as one batch on both or as batches of 1-3 sentences two at a time: what one thread finds
    (a differing 1-best only where float32 sums in other batches broke a tie)."""
    two = CT2Translator(
        translator.model_dir, compute_type="float32", threads=2, inter_threads=inter_threads,
        max_batch_size=max_batch_size,
    )  # fmt: skip
    assert two.translator.num_translators == (inter_threads or 2)
    two.translator = CallCounter(two.translator)
    found = zip(sources, two.search(sources, beam=4, **LIMIT), translator.search(sources, beam=4, **LIMIT), strict=True)
    for src, (a,), (b,) in found:
        assert close(a.logprob, b.logprob)
        if a.tokens != b.tokens:
            assert close(sequence_logprob(model, src, a.tokens), sequence_logprob(model, src, b.tokens))
    expected = max_batch_size or batch_sentences(two.inter_threads, beam=4)
    assert {kw["max_batch_size"] for kw in two.translator.calls} == {expected}


def test_batches_at_once_by_default_on_cpu_one_on_gpu():
    assert [parallel_batches("cpu", t) for t in (1, 2, 3, 4, 16)] == [1, 2, 3, 4, 4]
    assert parallel_batches("cuda", 16) == 1
    assert [batch_sentences(2, beam) for beam in (1, 4, 5, 6)] == [256, 64, 52, 43]  # ⌈256 / beam⌉
    assert batch_sentences(1, 4) == 0  # one batch at a time: the call as it is


@pytest.mark.parametrize("kwargs", [{"threads": -1}, {"inter_threads": -2}, {"max_batch_size": -1}])
def test_negative_batching_is_a_clear_error(ct2_dir, kwargs):
    with pytest.raises(ValueError, match=rf"{next(iter(kwargs))} \(-\d\).*must be >= 0"):
        CT2Translator(ct2_dir, compute_type="float32", **kwargs)


def test_rescore_gives_our_log_probs_of_every_hypothesis(model, sources, translator):
    for src, hyps in zip(sources, translator.search(sources, beam=4, nbest=4, rescore=True, **LIMIT), strict=True):
        assert len(hyps) == 4 and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert close(h.logprob, sequence_logprob(model, src, h.tokens))
            assert close(h.score, h.logprob / ((5 + len(h.tokens) + 1) / 6) ** 0.6)


def test_enough_patience_finds_the_bound_rules_best(model, sources, translator):
    """Our default stop ("bound") searches on while a live hypothesis could still win; CTranslate2 has no such
    rule, but the live beams do not depend on the stop rule, so searching longer (patience) finds its best
    here (not a theorem: no patience is known to suffice in advance). α = 1.5 favours long outputs, so that
    the two rules disagree on some sentences."""
    options = dict(beam=4, alpha=1.5, **LIMIT)
    bound = [h[0].tokens for h in beam_search(model, pad(sources), stop="bound", **options)]
    k_finished = [h[0].tokens for h in beam_search(model, pad(sources), stop="k_finished", **options)]
    assert k_finished != bound  # else this test shows nothing
    assert [h[0].tokens for h in translator.search(sources, patience=1, **options)] == k_finished
    assert [h[0].tokens for h in translator.search(sources, patience=4, **options)] == bound


def test_maximum_length_is_ours_and_hypotheses_cut_there_end_with_eos(model, sources, translator):
    for a, b in ((0.0, 2), (0.5, 1), (0.0, 0)):
        limits = [min(math.floor(a * len(s)) + b, 63) for s in sources]
        ours = beam_search(model, pad(sources), beam=4, max_len_a=a, max_len_b=b, stop="k_finished")
        theirs = translator.search(sources, beam=4, nbest=4, max_len_a=a, max_len_b=b)
        same = 0
        for src, limit, o, t in zip(sources, limits, ours, theirs, strict=True):
            assert all(len(h.tokens) <= limit for h in t)
            assert all(close(h.logprob, sequence_logprob(model, src, h.tokens)) for h in t)
            same += t[0].tokens == o[0].tokens
        # Not always equal: at the limit ours ends every live beam with its eos, CTranslate2 the beam best
        # candidates (cut back and re-scored with the eos); see the module docstring.
        assert same >= 0.75 * len(sources)


@pytest.fixture
def counted(ct2_dir):
    t = CT2Translator(ct2_dir, compute_type="float32", threads=1)
    t.translator = CallCounter(t.translator)
    return t


@pytest.mark.parametrize("beam, length_penalty, alpha", [(1, "gnmt", 0.6), (4, "gnmt", 0.6), (4, "hf", 1.5)])
@pytest.mark.parametrize("max_len_a, max_len_b", [(1.0, 10), (0.5, 2), (1.0, 0)])
def test_one_call_gives_what_calls_by_limit_give(model, sources, counted, beam, length_penalty, alpha, max_len_a,
                                                 max_len_b):  # fmt: skip
    """Decoding all sentences with the longest limit, then again by limit those that ran into their own, is the
    same search as decoding by limit: every hypothesis, its log-prob and score. (1.0, 10): nearly all stop
    early; (0.5, 2): most reach their limit; (1.0, 0): some do, the others stop one step before it."""
    options = dict(beam=beam, nbest=beam, alpha=alpha, length_penalty=length_penalty, max_len_a=max_len_a,
                   max_len_b=max_len_b)  # fmt: skip
    limits = {counted.max_output_length(len(s), max_len_a, max_len_b) for s in sources}
    by_limit = counted.search(sources, one_call=False, **options)
    assert sorted(counted.translator.limits) == sorted(limits)
    counted.translator.calls.clear()
    one = counted.search(sources, one_call=True, **options)
    assert counted.translator.limits[0] == max(limits) and len(counted.translator.limits) <= len(limits)
    redone = len(counted.translator.limits) - 1
    for src, a, b in zip(sources, by_limit, one, strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert close(x.logprob, y.logprob) and close(x.score, y.score)
            if x.tokens != y.tokens:  # a tie, decided by float32 sums in batches of other sizes
                assert close(sequence_logprob(model, src, x.tokens), sequence_logprob(model, src, y.tokens))
    # Redone: exactly the limits of the sentences whose own search ran into their limit (the others stopped as
    # early in the one call), read off the by-limit results, so the count does not rest on how far the model
    # learned in its few seconds (float rounding, hence the CPU, moves that).
    own = [counted.max_output_length(len(s), max_len_a, max_len_b) for s in sources]
    ran_into = [any(len(h.tokens) == lim for h in hyps) for lim, hyps in zip(own, by_limit, strict=True)]
    reached = {lim for lim, cut in zip(own, ran_into, strict=True) if cut and lim < max(limits)}
    assert redone == len(reached)
    if (max_len_a, max_len_b) == (1.0, 10):  # the point of it: fewer calls than one per limit
        assert len(limits) == 7 and 1 + redone < len(limits)
    else:  # the redo path ran: most sentences reach (0.5, 2), some the source length (1.0, 0)
        assert redone >= 1


def test_calls_by_limit_while_most_sentences_reach_it(sources, counted):
    """The default tries one call, and goes by limit after a search in which most sentences reached their
    limit (the one call would be wasted), until most end early again."""
    tight, loose = dict(max_len_a=0.0, max_len_b=2), dict(max_len_a=1.0, max_len_b=10)
    counted.search(sources, beam=4, **tight)  # one limit for every sentence (a = 0), and most reach it
    assert counted.ended_early_share < 0.5
    counted.translator.calls.clear()
    counted.search(sources, beam=4, **loose)
    assert len(counted.translator.limits) == len({counted.max_output_length(len(s), 1.0, 10) for s in sources})
    assert counted.ended_early_share >= 0.5
    counted.translator.calls.clear()
    counted.search(sources, beam=4, **loose)
    assert len(counted.translator.limits) <= 2
    with pytest.raises(ValueError, match="one_call"):
        counted.search(sources, beam=4, alpha=0.0, one_call=True)


def test_empty_source_is_not_decoded(translator):
    """CTranslate2 skips a source without content (only eos): the empty hypothesis, log-prob 0."""
    assert translator.search([[EOS_ID]], beam=4) == [[([], 0.0, 0.0)]]


def test_int8_runs_and_mostly_agrees(model_file, sources, translator, tmp_path):
    if "int8" not in ctranslate2.get_supported_compute_types("cpu"):
        pytest.skip("no int8 on this CPU")
    reference = [h[0].tokens for h in translator.search(sources, beam=4, **LIMIT)]
    convert(model_file, tmp_path / "int8", quantization="int8")
    for folder, compute_type in ((tmp_path / "int8", "default"), (translator.model_dir, "int8")):
        quantized = CT2Translator(folder, compute_type=compute_type, threads=1)
        assert quantized.compute_type.startswith("int8")
        tokens = [h[0].tokens for h in quantized.search(sources, beam=4, **LIMIT)]
        assert sum(a == b for a, b in zip(tokens, reference, strict=True)) >= 0.75 * len(sources)


def test_unsupported_compute_type_is_a_clear_error(ct2_dir):
    supported = ctranslate2.get_supported_compute_types("cpu")
    assert "float16" not in supported  # CTranslate2 has no float16 on CPUs
    for bad in ("float16", "fp8"):
        with pytest.raises(ValueError, match=r"decode\.compute_type 'f\w+'.*supported there: .*float32"):
            CT2Translator(ct2_dir, device="cpu", compute_type=bad)
    check_compute_type("auto", "cpu")
    check_compute_type("float32", "cpu")


def test_ct2_length_penalty_is_hf_alpha_and_gnmt_slope():
    assert ct2_length_penalty("hf", 0.6, 4, 10.0) == 0.6
    assert ct2_length_penalty("gnmt", 0.6, 4, 10.0) == pytest.approx(0.6 * 10 / 15)
    assert ct2_length_penalty("gnmt", 0.6, 1, 10.0) == 0.0 and ct2_length_penalty("hf", 0.0, 4, 10.0) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beam=0), "beam"),
        (dict(beam=2, nbest=3), "nbest"),
        (dict(length_penalty="wu"), "length_penalty"),
        (dict(patience=0), "patience"),
    ],
)
def test_bad_arguments_are_named(translator, sources, kwargs, message):
    with pytest.raises(ValueError, match=message):
        translator.search(sources, **kwargs)


def test_bad_sources_are_named(translator):
    with pytest.raises(ValueError, match="max_positions"):
        translator.search([[5] * 64 + [EOS_ID]])
    with pytest.raises(ValueError, match="vocabulary"):
        translator.search([[V, EOS_ID]])


def test_failed_conversion_leaves_the_old_folder(model_file, tmp_path):
    out = tmp_path / "ct2"
    convert(model_file, out)
    before = (out / "model.bin").read_bytes()
    bogus = tmp_path / "notes.pt"
    bogus.write_text("hello")
    with pytest.raises(ValueError, match="notes.pt"):
        convert(bogus, out)
    with pytest.raises(ValueError, match="distinct"):
        convert(model_file, out, tokens=["x"] * V)
    assert (out / "model.bin").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sentencepiece_pieces_become_the_vocabulary(translator, sources, tmp_path):
    """A model file that embeds its BPE model (as `average` writes it) is converted with the pieces as tokens;
    ids round-trip, so the search gives what the placeholder vocabulary gives."""
    import hashlib

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdé") for _ in range(rng.randint(1, 5))) for _ in range(300)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[i : i + 8]) for i in range(0, 300, 8)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=V, model_type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
    )  # fmt: skip
    data = (tmp_path / "spm.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert len(pieces) == V and "▁é" in pieces
    blob = torch.load(translator.meta["source"], weights_only=True)
    bpe = {"model_proto": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    save_model(tmp_path / "model.pt", (blob["model"], blob["config"]), extra={"bpe": bpe})
    convert(tmp_path / "model.pt", tmp_path / "ct2")
    assert json.loads((tmp_path / "ct2" / "shared_vocabulary.json").read_text(encoding="utf-8")) == pieces
    with_pieces = CT2Translator(tmp_path / "ct2", compute_type="float32", threads=1)
    assert with_pieces.search(sources, **LIMIT) == translator.search(sources, **LIMIT)
    bpe["sha256"] = hashlib.sha256(b"another model").hexdigest()
    save_model(tmp_path / "model.pt", (blob["model"], blob["config"]), extra={"bpe": bpe})
    with pytest.raises(ValueError, match="sha256"):
        convert(tmp_path / "model.pt", tmp_path / "ct2")
