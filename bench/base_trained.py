"""A base-shaped model that ends its sentences with eos, and newstest-sized inputs for it (issue #28's last target:
decoding base at newstest size with "a trained-enough model that stops at eos").

Base (6+6 layers, d_model 512, a 37,000-token vocabulary: the `wmt14-base` preset's shape) trained for a few
hundred updates on Multi30k train with the 8k BPE model of bench/beam.py (ids below 8,000; the other rows of the
37k embedding are never targets, so training pushes their logits down like any unseen token's), on pairs of 2
or 3 Multi30k sentence pairs joined into one (mean ~36 source tokens, about newstest2014's ~34 in a 37k joint
BPE). The decode inputs are joined the same way from Multi30k valid and test, which it never trained on, with
their joined references. Nobody should read its BLEU as a translation quality: the point is a search whose
ends the model decides with its own eos, not a cap. (300 updates end every output with eos, but do not teach
it to follow its source: its outputs are ~15 tokens; bench/README.md.)

The model is cached in --cache (outside the repository) by its number of updates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from bench.beam import SRC, TGT, encode, fit, prepare_data
from transformer.batching import PackedCorpus, fixed_batches
from transformer.checkpoint import load_model, save_model
from transformer.loss import LossSums, projected_label_smoothed_nll_loss
from transformer.model import EOS_ID, PAD_ID, Transformer, make_config

VOCAB = 37_000
JOIN = (2, 3)  # sentence pairs per joined pair


def draws(n: int, pool: int, seed: int) -> list[np.ndarray]:
    """`n` draws of 2 or 3 indices below `pool`: which sentences each joined one is made of."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, pool, rng.choice(JOIN)) for _ in range(n)]


def join(seqs: list[list[int]], picks: np.ndarray) -> list[int]:
    """The sentences `picks` of `seqs` (each ending with eos) one after the other, one eos at the end."""
    return [t for i in picks for t in seqs[i][:-1]] + [EOS_ID]


def inputs(multi30k: Path, sp: spm.SentencePieceProcessor, n: int, seed: int = 1):
    """`n` joined sources from Multi30k valid + test (ids, eos last) and their joined references (text)."""
    rows = [json.loads(x) for f in ("val.jsonl", "test.jsonl") for x in (multi30k / f).read_text().splitlines()]
    enc = encode(sp, [r[SRC] for r in rows])
    picks = draws(n, len(rows), seed)
    return [join(enc, p) for p in picks], [" ".join(rows[i][TGT] for i in p) for p in picks]


def train(raw: Path, sp: spm.SentencePieceProcessor, updates: int, max_tokens: int, log) -> Transformer:
    """Base, `updates` updates of ~`max_tokens` target tokens on joined Multi30k train pairs; peak rate 7e-4
    (§5.3's for base) after a short warm-up."""
    torch.manual_seed(0)
    src = encode(sp, (raw / f"train.{SRC}").read_text(encoding="utf-8").splitlines())
    tgt = encode(sp, (raw / f"train.{TGT}").read_text(encoding="utf-8").splitlines())
    picks = draws(len(src), len(src), seed=0)
    corpus = PackedCorpus.from_pairs([(join(src, p), join(tgt, p)) for p in picks])
    batches = fixed_batches(corpus.src_lengths, corpus.tgt_lengths, max_tokens)
    model = Transformer(make_config("base", VOCAB))
    return fit(model, corpus, batches, updates, 7e-4, min(100, updates // 2 + 1), log, every=25, loss=projected)


def projected(model: Transformer, batch) -> LossSums:
    """Label smoothing 0.1 projected only at real target positions, as the train stage computes it."""
    keep = batch.tgt_out.ne(PAD_ID)  # (B, T)
    hidden = model(batch.src, batch.tgt_in, keep, project=False)  # (N, d_model)
    return projected_label_smoothed_nll_loss(hidden, model.embed.weight, batch.tgt_out[keep], 0.1)


def trained_base(cache: Path, multi30k: Path, updates: int, max_tokens: int, log):
    """(model, sentencepiece model): trained now unless cached."""
    raw, sp = prepare_data(cache, multi30k, 8000)
    weights = cache / f"base-joined-{updates}u-{max_tokens}t.pt"
    if weights.exists():
        return load_model(weights)[0].eval(), sp
    log(f"training base for {updates} updates on joined Multi30k pairs (cached in {weights})")
    model = train(raw, sp, updates, max_tokens, log)
    save_model(weights, model)
    return model, sp
