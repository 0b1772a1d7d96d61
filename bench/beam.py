"""Decoding speed on CPU: our `beam_search` (the torch engine) and CTranslate2 (float32, int8) against Hugging Face
`MarianMTModel.generate`, same weights, same sentences, same batches, in the same run; BLEU and peak memory too.

    python -m bench.beam [--sentences 500] [--model models/average.pt --spm data/bpe/spm.model]

Without --model, a `multi30k`-preset model is trained briefly on Multi30k train (a joint 8k BPE model first), so
that translations are real sentences of varied length, not a random model's loops; both are cached in
--cache (outside the repository) so that re-runs start decoding at once. The weights go to Marian through
`pipeline.commands.export_marian.to_marian`, whose test shows it computes our function.

Equal work: beam 4, length normalisation log P / |Y|^α ("hf" in our search, `length_penalty=α` in generate;
|Y| counts the eos), a sentence done once 4 hypotheses have finished (`stop="k_finished"`,
`early_stopping=True`), the same maximum output length for every sentence, pad and bos forbidden
(`suppress_tokens`), the same batches of sentences (sorted by length), float32, the same threads. The engines'
rows decode as the decode stage does (GNMT length penalty; `decode.engine`), CTranslate2 from our own
conversion (pipeline/common/ct2_convert.py), at `decode.compute_type` float32 and int8. BLEU: sacreBLEU of the
detokenised output against the test references; peak memory: the process's resident size above what it held
before the system ran, sampled every 10 ms.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import psutil
import sentencepiece as spm
import torch
from sacrebleu.metrics import BLEU

from pipeline.commands.export_marian import to_marian
from pipeline.common.ct2_engine import CT2Translator
from pipeline.common.engines import converted_model
from pipeline.common.params import BpeParams, DataParams
from pipeline.download import download
from pipeline.learn_bpe import learn_bpe
from transformer.batching import PackedCorpus, collate, fixed_batches, pad_right, translation_batches
from transformer.beam_search import beam_search
from transformer.checkpoint import load_model, save_model
from transformer.loss import label_smoothed_nll_loss
from transformer.model import BOS_ID, EOS_ID, PAD_ID, Transformer, make_config
from transformer.schedule import make_optimizer, peak_rate

REPO = Path(__file__).resolve().parents[1]

SRC, TGT = "en", "de"


def prepare_data(cache: Path, multi30k: Path, vocab: int) -> tuple[Path, spm.SentencePieceProcessor]:
    raw, bpe = cache / "raw", cache / f"bpe{vocab}"
    if not raw.exists():
        download(DataParams(dataset=str(multi30k), config=None), raw)
    if not bpe.exists():
        learn_bpe(raw, bpe, SRC, TGT, BpeParams(vocab_size=vocab))
    return raw, spm.SentencePieceProcessor(model_file=str(bpe / "spm.model"))


def encode(sp: spm.SentencePieceProcessor, lines: list[str]) -> list[list[int]]:
    return [ids + [EOS_ID] for ids in sp.encode(lines)]


def train(raw: Path, sp: spm.SentencePieceProcessor, updates: int, max_tokens: int, log) -> Transformer:
    """A few hundred updates of the multi30k preset: enough for fluent-looking, varied-length output."""
    torch.manual_seed(0)
    src = encode(sp, (raw / f"train.{SRC}").read_text(encoding="utf-8").splitlines())
    tgt = encode(sp, (raw / f"train.{TGT}").read_text(encoding="utf-8").splitlines())
    corpus = PackedCorpus.from_pairs(list(zip(src, tgt, strict=True)))
    batches = fixed_batches(corpus.src_lengths, corpus.tgt_lengths, max_tokens)  # length-sorted, padding counted
    model = Transformer(make_config("multi30k", sp.get_piece_size()))
    warmup = min(400, updates // 2 + 1)  # a short run: §5.3's shape, scaled to peak at 1.5e-3
    return fit(model, corpus, batches, updates, 1.5e-3, warmup, log)


def fit(model, corpus, batches, updates: int, peak: float, warmup: int, log, every: int = 50, loss=None):
    """`updates` Adam updates of `model` on batches drawn at random from `batches` (index arrays into `corpus`),
    the rate §5.3's schedule scaled to `peak` after `warmup` updates; `loss(model, batch) -> LossSums`, by
    default label smoothing 0.1 over the full logits. Returns the model in eval mode."""
    factor = peak / peak_rate(model.cfg.d_model, warmup)
    optimizer, scheduler = make_optimizer(model, model.cfg.d_model, warmup=warmup, factor=factor)
    loss = loss or (lambda m, batch: label_smoothed_nll_loss(m(batch.src, batch.tgt_in), batch.tgt_out))
    model.train()
    start = time.perf_counter()
    for step in range(updates):
        sums = loss(model, collate(corpus, batches[torch.randint(len(batches), ()).item()]))
        optimizer.zero_grad()
        (sums.loss / sums.tokens).backward()
        optimizer.step()
        scheduler.step()
        if step % every == 0 or step == updates - 1:
            ppl = torch.exp(sums.nll / sums.tokens).item()
            log(f"  update {step + 1}/{updates}: ppl {ppl:.1f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def batches_of(src: list[list[int]], max_tokens: int) -> list[tuple[list[int], torch.Tensor]]:
    """The decode stage's batches (longest first, at most `max_tokens` padded source tokens): (indices, ids)."""
    return [
        (b.tolist(), pad_right([src[i] for i in b])) for b in translation_batches([len(x) for x in src], max_tokens)
    ]


def strip(ids: list[int]) -> list[int]:
    out = [i for i in ids if i not in (PAD_ID, BOS_ID)]
    return out[: out.index(EOS_ID)] if EOS_ID in out else out


def now(args) -> float:
    return time.perf_counter() if args.clock == "wall" else time.process_time()


def run_ours(model, batches, n, args, **options) -> tuple[list[list[int]], float]:
    out: list[list[int]] = [[] for _ in range(n)]
    start = now(args)
    for idx, src in batches:
        hyps = beam_search(
            model, src, beam=args.beam, alpha=args.alpha, max_len_a=0.0, max_len_b=args.max_len, **options
        )
        for i, h in zip(idx, hyps, strict=True):
            out[i] = h[0].tokens
    return out, now(args) - start


@torch.inference_mode()
def run_hf(marian, batches, n, args) -> tuple[list[list[int]], float]:
    out: list[list[int]] = [[] for _ in range(n)]
    start = now(args)
    for idx, src in batches:
        generated = marian.generate(
            input_ids=src,
            attention_mask=src.ne(PAD_ID).long(),
            num_beams=args.beam,
            num_return_sequences=1,
            do_sample=False,
            length_penalty=args.alpha,
            early_stopping=True,
            max_new_tokens=args.max_len + 1,  # max_len tokens + eos
            min_length=0,
            suppress_tokens=[PAD_ID, BOS_ID],
            no_repeat_ngram_size=0,
            repetition_penalty=1.0,
        )
        for i, row in zip(idx, generated.tolist(), strict=True):
            out[i] = strip(row)
    return out, now(args) - start


class PeakRss:
    """The most this process's resident memory rose above its level at entry, sampled by a thread (MB)."""

    def __enter__(self):
        self.proc, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.mb = max(self.peak, self.proc.memory_info().rss - self.base) / 1e6


def run_ct2(engine: CT2Translator, src, batches, n, args) -> tuple[list[list[int]], float]:
    out: list[list[int]] = [[] for _ in range(n)]
    start = now(args)
    for idx, _ in batches:
        hyps = engine.search(
            [src[i] for i in idx], beam=args.beam, alpha=args.alpha, max_len_a=0.0, max_len_b=args.max_len
        )
        for i, h in zip(idx, hyps, strict=True):
            out[i] = h[0].tokens
    return out, now(args) - start


def ct2_engines(folder: Path, args) -> dict[str, CT2Translator]:
    """The converted model loaded at float32 and int8 with the engine's default batching (on a CPU, batches
    of ⌈256 / beam⌉ sentences, one per thread at once), and with --ct2-serial also as one batch at a time on
    every thread (the default before: keys "float32, one batch at a time", ...)."""
    engines = {ct: CT2Translator(folder, compute_type=ct, threads=args.threads) for ct in ("float32", "int8")}
    if args.ct2_serial:
        for ct in ("float32", "int8"):
            engines[f"{ct}, one batch at a time"] = CT2Translator(
                folder, compute_type=ct, threads=args.threads, inter_threads=1
            )
    return engines


def add_ct2_serial_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ct2-serial",
        action="store_true",
        help="also CTranslate2 decoding one batch at a time on every thread (inter_threads 1: the default before)",
    )


def get_model(args, log) -> tuple[Transformer, spm.SentencePieceProcessor]:
    raw, sp = prepare_data(args.cache, args.multi30k, args.vocab)
    if args.model:
        model, _ = load_model(args.model)
        return model, spm.SentencePieceProcessor(model_file=str(args.spm))
    weights = args.cache / f"multi30k-bpe{args.vocab}-{args.updates}u.pt"
    if weights.exists():
        return load_model(weights)[0], sp
    log(f"training the multi30k preset for {args.updates} updates (cached in {weights})")
    model = train(raw, sp, args.updates, args.max_tokens, log)
    save_model(weights, model)
    return model, sp


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--multi30k", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    p.add_argument("--cache", type=Path, default=Path("/tmp/transformer-bench-beam"), help="outside the repo")
    p.add_argument("--model", type=Path, help="a model file (transformer.checkpoint.save_model); needs --spm")
    p.add_argument("--spm", type=Path, help="the sentencepiece model that goes with --model")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=1500, help="target tokens per training batch")
    p.add_argument("--sentences", type=int, default=500)
    p.add_argument(
        "--batch-tokens", type=int, default=8000, help="padded source tokens a batch, every system: decode.max_tokens"
    )
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--max-len", type=int, default=80, help="output tokens before eos, every sentence")
    p.add_argument("--repeat", type=int, default=2, help="timed passes per system (the fastest counts)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU seconds, steadier than wall time when other jobs share the cores",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    add_ct2_serial_flag(p)
    args = p.parse_args(argv)
    if args.model and not args.spm:
        p.error("--model needs --spm")
    if not (args.multi30k / "test.jsonl").exists():
        p.error(f"{args.multi30k / 'test.jsonl'} not found: pass --multi30k <folder of the Multi30k jsonl files>")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    model, sp = get_model(args, log)
    marian = to_marian(model).eval()
    lines = [json.loads(x)[SRC] for x in (args.multi30k / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    src = encode(sp, lines[: args.sentences])
    batches = batches_of(src, args.batch_tokens)
    n = len(src)
    model_file = args.cache / "bench-model.pt"
    save_model(model_file, model)
    ct2 = ct2_engines(converted_model(model_file), args)
    runs = {
        "ours (hf length norm, k_finished)": lambda: run_ours(
            model, batches, n, args, length_penalty="hf", stop="k_finished"
        ),
        "HF MarianMTModel.generate": lambda: run_hf(marian, batches, n, args),
        "torch engine (GNMT lp, bound stop: decode's default)": lambda: run_ours(model, batches, n, args),
    } | {f"CTranslate2 {key} (GNMT lp)": lambda e=e: run_ct2(e, src, batches, n, args) for key, e in ct2.items()}
    run_ours(model, batches[:1], n, args)  # warm-up: first-call allocations, kernel selection
    run_hf(marian, batches[:1], n, args)
    for engine in ct2.values():
        run_ct2(engine, src, batches[:1], n, args)
    outputs, seconds, memory = {}, {name: float("inf") for name in runs}, dict.fromkeys(runs, 0.0)
    for _ in range(args.repeat):  # interleaved, so load from other jobs hits every system alike
        for name, fn in runs.items():
            with PeakRss() as rss:
                outputs[name], sec = fn()
            seconds[name], memory[name] = min(seconds[name], sec), max(memory[name], rss.mb)
    refs = [json.loads(x)[TGT] for x in (args.multi30k / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    bleu = {k: BLEU().corpus_score([sp.decode(o) for o in v], [refs[:n]]).score for k, v in outputs.items()}
    report(args, n, outputs, seconds, sp, bleu, memory)


def report(args, n, outputs, seconds, sp, bleu, memory) -> None:
    ours, peer, default, *_ = list(outputs)
    same = sum(a == b for a, b in zip(outputs[ours], outputs[peer], strict=True)) / n
    print(
        f"\n{n} Multi30k test sentences (En->De), beam {args.beam}, alpha {args.alpha}, batches of "
        f"{args.batch_tokens} source tokens, max {args.max_len} tokens, {args.threads} threads, {args.clock} clock, "
        f"best of {args.repeat}\n"
    )
    print("| system | seconds | sentences/s | vs HF | sacreBLEU | peak MB above start |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in outputs:
        speed = f"{seconds[name]:.2f} | {n / seconds[name]:.1f} | {seconds[peer] / seconds[name]:.2f}x"
        print(f"| {name} | {speed} | {bleu[name]:.2f} | {memory[name]:.0f} |")
    lengths = [len(x) for x in outputs[ours]]
    # At the maximum length we end with a forced eos (scored), generate() truncates: only there may they differ.
    ended = [i for i in range(n) if max(len(outputs[ours][i]), len(outputs[peer][i])) < args.max_len]
    same_ended = sum(outputs[ours][i] == outputs[peer][i] for i in ended) / max(len(ended), 1)
    print(
        f"\nidentical translations, ours vs HF (same settings): {same:.1%}; among the {len(ended)} that both "
        f"ended before the maximum length: {same_ended:.1%}"
    )
    print(
        f"mean output length {sum(lengths) / n:.1f} tokens; at the maximum: {sum(x >= args.max_len for x in lengths)}"
    )
    for i in range(min(3, n)):
        print(f"  e.g. {sp.decode(outputs[ours][i])!r}")
    if args.json:
        figures = {"sentences": n, "seconds": seconds, "identical": same, "identical_ended": same_ended}
        figures |= {"bleu": bleu, "peak_mb": memory}
        figures["speedup"] = seconds[peer] / seconds[ours]
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
