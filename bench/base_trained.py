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
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from bench.beam import SRC, TGT, encode, prepare_data
from transformer.batching import PackedCorpus, collate, fixed_batches
from transformer.checkpoint import load_model, save_model
from transformer.loss import projected_label_smoothed_nll_loss
from transformer.model import EOS_ID, PAD_ID, Transformer, make_config
from transformer.schedule import make_optimizer, peak_rate

VOCAB = 37_000
JOIN = (2, 3)  # sentence pairs per joined pair


def joined(src: list[list[int]], tgt: list[list[int]], n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """`n` pairs, each 2 or 3 random pairs of (src, tgt) one after the other, one eos at the end of each side."""
    rng = np.random.default_rng(seed)
    out_src, out_tgt = [], []
    for _ in range(n):
        picks = rng.integers(0, len(src), rng.choice(JOIN))
        out_src.append([t for i in picks for t in src[i][:-1]] + [EOS_ID])
        out_tgt.append([t for i in picks for t in tgt[i][:-1]] + [EOS_ID])
    return out_src, out_tgt


def inputs(multi30k: Path, sp: spm.SentencePieceProcessor, n: int, seed: int = 1):
    """`n` joined sources from Multi30k valid + test (ids, eos last) and their joined references (text)."""
    rows = [json.loads(x) for f in ("val.jsonl", "test.jsonl") for x in (multi30k / f).read_text().splitlines()]
    src_lines, tgt_lines = [r[SRC] for r in rows], [r[TGT] for r in rows]
    rng = np.random.default_rng(seed)
    enc = encode(sp, src_lines)
    sources, refs = [], []
    for _ in range(n):
        picks = rng.integers(0, len(enc), rng.choice(JOIN))
        sources.append([t for i in picks for t in enc[i][:-1]] + [EOS_ID])
        refs.append(" ".join(tgt_lines[i] for i in picks))
    return sources, refs


def train(raw: Path, sp: spm.SentencePieceProcessor, updates: int, max_tokens: int, log) -> Transformer:
    """Base, `updates` updates of ~`max_tokens` target tokens on joined Multi30k train pairs; peak rate 7e-4
    (§5.3's for base) after a short warm-up."""
    torch.manual_seed(0)
    src = encode(sp, (raw / f"train.{SRC}").read_text(encoding="utf-8").splitlines())
    tgt = encode(sp, (raw / f"train.{TGT}").read_text(encoding="utf-8").splitlines())
    corpus = PackedCorpus.from_pairs(list(zip(*joined(src, tgt, len(src), seed=0), strict=True)))
    batches = fixed_batches(corpus.src_lengths, corpus.tgt_lengths, max_tokens)
    model = Transformer(make_config("base", VOCAB))
    warmup = min(100, updates // 2 + 1)
    optimizer, scheduler = make_optimizer(model, model.cfg.d_model, warmup=warmup,
                                          factor=7e-4 / peak_rate(model.cfg.d_model, warmup))  # fmt: skip
    model.train()
    start = time.perf_counter()
    for step in range(updates):
        batch = collate(corpus, batches[torch.randint(len(batches), ()).item()])
        keep = batch.tgt_out.ne(PAD_ID)  # (B, T)
        hidden = model(batch.src, batch.tgt_in, keep, project=False)  # (N, d_model)
        sums = projected_label_smoothed_nll_loss(hidden, model.embed.weight, batch.tgt_out[keep], 0.1)
        optimizer.zero_grad()
        (sums.loss / sums.tokens).backward()
        optimizer.step()
        scheduler.step()
        if step % 25 == 0 or step == updates - 1:
            ppl = torch.exp(sums.nll / sums.tokens).item()
            log(f"  update {step + 1}/{updates}: ppl {ppl:.1f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


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
