"""Training-step time of candidate model shapes RELATIVE to a reference shape, on real batches (issue #19).

    python -m bench.shapes --data 8000=/path/to/data/bin [--data 10000=/path/to/bin10k] \
        ref=multi30k  tiny=tiny-wu,vocab=10000  w256f512=multi30k,d_ff=512 ...

Each contender is `NAME=ARCH[,key=value...]`: a preset of `transformer.model.PRESETS` with `TransformerConfig`
overrides, plus `vocab=` (which binarised corpus, a `--data` entry) and `update_tokens=` (the batch). The first
is the reference. Every contender is a real `transformer.training.Trainer` (dropout, the chunked projection+loss,
fused Adam, the schedule) stepping through epoch 0 of its own batch plan (`train.seed` 1), exactly as training
does; the contenders alternate update by update, so that other jobs on a shared machine slow all of them alike,
and only ratios are reported with confidence. Absolute updates/s move with the machine's load; ratios do not.

Reported per contender: mean seconds per update (wall and process CPU; the sum over updates is what a time budget
spends, so the mean, not the median), target tokens and sentences per update, and the ratios to the reference:
updates per minute, and epochs per minute (a different vocabulary or batch cuts the corpus into other updates).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bench.common import set_threads
from transformer.model import make_config
from transformer.training import Trainer, TrainingConfig


def load_train(folder: Path):
    from transformer.batching import PackedCorpus
    from transformer.corpus import ParallelCorpus, read_meta

    meta = read_meta(folder)
    corpus = ParallelCorpus.load(folder, "train", meta["langs"]["source"], meta["langs"]["target"])
    return meta, PackedCorpus.from_corpus(corpus)


def parse_contender(spec: str) -> tuple[str, str, dict, int | None, int]:
    name, _, rest = spec.partition("=")
    arch, *pairs = rest.split(",")
    overrides, vocab, update_tokens = {}, None, 2048
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "vocab":
            vocab = int(value)
        elif key == "update_tokens":
            update_tokens = int(value)
        else:
            overrides[key] = float(value) if key.endswith("dropout") else int(value)
    return name, arch, overrides, vocab, update_tokens


def build(spec: str, corpora: dict[int, tuple[dict, object]], default_vocab: int) -> tuple[str, Trainer]:
    name, arch, overrides, vocab, update_tokens = parse_contender(spec)
    meta, train = corpora[vocab or default_vocab]
    model_cfg = make_config(arch, meta["vocab_size"], **overrides)
    cfg = TrainingConfig(
        update_tokens=update_tokens, max_tokens=update_tokens, warmup=400, lr_factor=0.7,
        checkpoint_every_minutes=None, checkpoint_every_updates=10**9,
    )  # fmt: skip
    return name, Trainer(model_cfg, cfg, train)


def main() -> None:
    ap = argparse.ArgumentParser(description="training-step time of model shapes relative to a reference")
    ap.add_argument("contenders", nargs="+", help="NAME=ARCH[,key=value...]; the first is the reference")
    ap.add_argument("--data", action="append", required=True, help="VOCAB=folder of a binarised corpus")
    ap.add_argument("--updates", type=int, default=40, help="timed updates per contender")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    corpora = {int(v): load_train(Path(f)) for v, f in (d.split("=", 1) for d in args.data)}
    default_vocab = int(args.data[0].split("=", 1)[0])
    trainers = dict(build(s, corpora, default_vocab) for s in args.contenders)
    epochs = {name: t.plan.epoch(0) for name, t in trainers.items()}
    wall = {name: 0.0 for name in trainers}
    cpu = {name: 0.0 for name in trainers}
    tokens = {name: 0 for name in trainers}
    sentences = {name: 0 for name in trainers}
    for i in range(args.warmup + args.updates):
        for name, trainer in trainers.items():
            batch = epochs[name][i % len(epochs[name])]
            w0, c0 = time.perf_counter(), time.process_time()
            step = trainer.train_step(batch)
            if i >= args.warmup:
                wall[name] += time.perf_counter() - w0
                cpu[name] += time.process_time() - c0
                tokens[name] += step.tokens
                sentences[name] += sum(len(m) for m in batch)
    ref = next(iter(trainers))
    n = args.updates
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads; mean of {n} updates after "
          f"{args.warmup} warm-up, contenders alternating update by update; reference {ref}")  # fmt: skip
    head = ("contender", "params", "s/update", "cpu s/upd", "tgt tok/upd", "sent/upd", "updates/min x", "(by CPU s)",
            "epochs/min x")  # fmt: skip
    print(" | ".join(f"{h:>13}" for h in head))
    per_epoch = {name: len(trainers[name].train_data) / (sentences[name] / n) for name in trainers}
    for name, trainer in trainers.items():
        speed, cpu_speed = wall[ref] / wall[name], cpu[ref] / cpu[name]
        epoch_speed = speed * per_epoch[ref] / per_epoch[name]
        cells = (name, f"{trainer.module.num_parameters() / 1e6:.2f}M", f"{wall[name] / n:.3f}", f"{cpu[name] / n:.3f}",
                 f"{tokens[name] / n:.0f}", f"{sentences[name] / n:.1f}", f"{speed:.2f}", f"{cpu_speed:.2f}",
                 f"{epoch_speed:.2f}")  # fmt: skip
        print(" | ".join(f"{c:>13}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
