"""The train stage against a plain PyTorch loop over Hugging Face `MarianMTModel`: the same model, the same
batches, the same minutes, on the same host, one after the other; updates, target tokens/s and test BLEU at
fixed minutes (issue #30).

    dvc exp run -S preset=multi30k binarise        # once: data/raw, data/bpe and data/bin of the preset
    python -m bench.train_stage --minutes 20 --marks 10 20

Run it in a workspace whose params.yaml is the preset to compare (the command above makes one).

The stage: the train stage's own command (`python -m pipeline.train`, as dvc.yaml runs it) in a scratch folder
whose params.yaml is the workspace's with `train.max_minutes` set (the budget counts from the stage's start, Ray
start-up included), with its own Ray storage and MLflow store; everything the stage does around its steps stays
on (checkpoints, snapshots, validation, attention maps, logging). Its models at the marks are its snapshots
(`train.snapshot_every_minutes` must divide every mark).

The peer, in this process once the stage has ended (before it starts, with `--loop-first`): `MarianMTModel` built by
`pipeline.commands.export_marian.to_marian` from our initial weights (same seed), trained by the loop a user
writes from the `transformers` docs — torch's default Adam, the inverse-square-root schedule, `F.cross_entropy`
with label smoothing, one `backward` per micro-batch — on the same global batches in the same order
(`transformer.batching.BatchPlan` with the preset's budgets and seed), with the preset's threads. Its recipe is
the peer's own (issue #30's table: dropout 0.1, warm-up 500, peak lr 1.4e-3, no cool-down; flags to change it);
its clock starts before the model is built. Its weights at each mark are copied in memory.

Every model is decoded by the same decoder, `MarianMTModel.generate` (beam 4, length normalisation α 0.6, as in
bench.beam), our snapshots through `to_marian`, so that the BLEU compares training, not decoders. Steady rates
are counted between the first snapshot mark and the last mark, where neither side is starting up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import sentencepiece as spm
import torch
import torch.nn.functional as F
import yaml
from sacrebleu.metrics import BLEU

from bench.beam import batches_of, encode, run_hf
from bench.common import workspace_plan
from pipeline.commands.export_marian import to_marian
from pipeline.common.layout import SNAPSHOT_INDEX, SPM_FILE
from pipeline.common.params import load_params
from transformer.batching import Position, collate
from transformer.checkpoint import load_model
from transformer.model import PAD_ID, Transformer, make_config
from transformer.schedule import peak_rate, rate

REPO = Path(__file__).resolve().parents[1]


def run_stage(workspace: Path, scratch: Path, minutes: float, log) -> tuple[dict, list[dict], float]:
    """The train stage's command with a `minutes` budget: (metrics/train.json, the snapshot index, wall seconds)."""
    params = yaml.safe_load((workspace / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["max_minutes"] = minutes
    params["train"]["storage_path"] = str(scratch / "ray")
    scratch.mkdir(parents=True)
    (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    (scratch / "data").symlink_to((workspace / "data").resolve())
    env = os.environ | {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlflow.db"}
    cmd = [sys.executable, "-m", "pipeline.train", "--data", "data/bin", "--out", "models/checkpoints",
           "--snapshots", "models/snapshots", "--raw", "data/raw", "--bpe", "data/bpe"]  # fmt: skip
    log(f"stage: {' '.join(cmd[1:])} in {scratch} (train.max_minutes={minutes}), log in {scratch / 'stage.log'}")
    start = time.time()
    with open(scratch / "stage.log", "w", encoding="utf-8") as out:
        subprocess.run(cmd, cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - start
    metrics = json.loads((scratch / "metrics" / "train.json").read_text(encoding="utf-8"))
    index = json.loads((scratch / "models" / "snapshots" / SNAPSHOT_INDEX).read_text(encoding="utf-8"))
    return metrics, index, wall


def peer_model(params, vocab_size: int, dropout: float) -> torch.nn.Module:
    """Our initial weights (the stage's seed) in a `MarianMTModel`, in training mode with the peer's dropout."""
    torch.manual_seed(params.train.seed)
    cfg = make_config(params.model.arch, vocab_size, **params.model.overrides())
    cfg = dataclasses.replace(cfg, dropout=dropout)
    return to_marian(Transformer(cfg)).train()


def run_peer(workspace: Path, args, marks: list[float], log) -> dict:
    """The plain loop for `args.minutes`: steps and target tokens at every mark, weights at the BLEU marks."""
    start = time.time()
    params, meta, train, plan = workspace_plan(workspace)
    torch.set_num_threads(params.train.cpus_per_worker)
    marian = peer_model(params, meta["vocab_size"], args.peer_dropout)
    d_model, V = marian.config.d_model, marian.config.vocab_size
    factor = args.peer_lr / peak_rate(d_model, args.peer_warmup)
    optimizer = torch.optim.Adam(marian.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: rate(i + 1, d_model, args.peer_warmup, factor))
    # torch spreads ε over all V classes, we over the V-1 others: this ε' gives the same target distribution.
    epsilon = params.train.label_smoothing * V / (V - 1)
    position, steps, tokens, at, weights = Position(), 0, 0, {}, {}
    pending = sorted(marks)
    while pending:
        elapsed = time.time() - start
        while pending and elapsed >= pending[0] * 60:
            mark = pending.pop(0)
            at[mark] = {"steps": steps, "tokens": tokens}
            if mark in args.marks:
                weights[mark] = {k: v.detach().clone() for k, v in marian.state_dict().items()}
            log(f"peer: {mark:g} min, {steps} steps")
        if not pending:
            break
        global_batch = plan.epoch(position.epoch)[position.index]
        target_tokens = plan.target_tokens(global_batch)
        optimizer.zero_grad(set_to_none=True)
        for micro in global_batch:
            batch = collate(train, micro)
            logits = marian(input_ids=batch.src, attention_mask=batch.src.ne(PAD_ID), decoder_input_ids=batch.tgt_in,
                            use_cache=False).logits  # fmt: skip
            loss = F.cross_entropy(logits.view(-1, V), batch.tgt_out.view(-1), ignore_index=PAD_ID,
                                   label_smoothing=epsilon, reduction="sum")  # fmt: skip
            (loss / target_tokens).backward()
        optimizer.step()
        scheduler.step()
        steps, tokens, position = steps + 1, tokens + target_tokens, plan.next_position(position)
    return {"at": at, "weights": weights, "marian": marian}


def stage_at(index: list[dict], marks: list[float]) -> dict[float, dict]:
    """The stage's snapshot at each mark: the first one labelled with that minute or later."""
    out = {}
    for mark in marks:
        later = [s for s in index if s["minutes"] >= mark - 1e-6]
        if not later:
            raise SystemExit(f"no snapshot at or after minute {mark}: the stage's snapshots are {index}")
        out[mark] = min(later, key=lambda s: s["minutes"])
    return out


def bleu_of(marian, src, refs, sp, args) -> float:
    decode = SimpleNamespace(beam=args.beam, alpha=args.alpha, max_len=args.max_len, clock="wall")
    outputs, _ = run_hf(marian.eval(), batches_of(src, 2000), len(src), decode)
    return BLEU().corpus_score([sp.decode(o) for o in outputs], [refs]).score


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", type=Path, default=Path("."), help="params.yaml and data/ of the preset")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/transformer-bench-train-stage"), help="emptied first")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--marks", type=float, nargs="+", default=[10.0, 20.0], help="minutes at which to score BLEU")
    p.add_argument("--loop-first", action="store_true", help="run the plain loop before the stage")
    p.add_argument("--peer-dropout", type=float, default=0.1)
    p.add_argument("--peer-warmup", type=int, default=500)
    p.add_argument("--peer-lr", type=float, default=1.4e-3, help="the peer's peak learning rate")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--max-len", type=int, default=80, help="output tokens before eos, every sentence")
    p.add_argument("--sentences", type=int, default=None, help="score on the first N test sentences (default all)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if max(args.marks) > args.minutes:
        p.error(f"--marks {args.marks} go past --minutes {args.minutes}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    workspace = args.workspace.resolve()
    params = load_params(workspace / "params.yaml")
    every = params.train.snapshot_every_minutes
    if every is None or any(abs(m / every - round(m / every)) > 1e-9 for m in args.marks):
        raise SystemExit(f"train.snapshot_every_minutes ({every}) must divide every mark {args.marks}")
    shutil.rmtree(args.scratch, ignore_errors=True)
    rate_marks = sorted({every * k for k in range(1, int(args.minutes // every) + 1)} | set(args.marks))
    if args.loop_first:
        peer = run_peer(workspace, args, rate_marks, log)
    metrics, index, stage_wall = run_stage(workspace, args.scratch, args.minutes, log)
    if not args.loop_first:
        peer = run_peer(workspace, args, rate_marks, log)
    stage = stage_at(index, rate_marks)
    sp = spm.SentencePieceProcessor(model_file=str(workspace / "data" / "bpe" / SPM_FILE))
    test = workspace / "data" / "raw"
    lines = (test / f"test.{params.data.source_lang}").read_text(encoding="utf-8").splitlines()[: args.sentences]
    src = encode(sp, lines)
    refs = (test / f"test.{params.data.target_lang}").read_text(encoding="utf-8").splitlines()[: len(src)]
    bleu = {}
    for mark in args.marks:
        log(f"decoding the models at {mark:g} minutes")
        peer["marian"].load_state_dict(peer["weights"][mark])
        bleu[("loop", mark)] = bleu_of(peer["marian"], src, refs, sp, args)
        model, _ = load_model(args.scratch / "models" / "snapshots" / stage[mark]["file"])
        bleu[("stage", mark)] = bleu_of(to_marian(model), src, refs, sp, args)
    report(args, metrics, stage_wall, stage, peer["at"], rate_marks, bleu)


def report(args, metrics: dict, stage_wall: float, stage: dict, peer: dict, rate_marks: list[float], bleu: dict):
    first, last = rate_marks[0], args.minutes
    stage_rate = (stage[last]["update"] - stage[first]["update"]) / (last - first)
    peer_rate = (peer[last]["steps"] - peer[first]["steps"]) / (last - first)
    first_run = "loop" if args.loop_first else "stage"
    print(f"\n{args.minutes:g} minutes each, back to back, {first_run} first; torch {torch.__version__}, "
          f"{os.cpu_count()} cores; BLEU: test sacreBLEU, MarianMTModel.generate beam {args.beam}, "
          f"alpha {args.alpha}\n")  # fmt: skip
    print("| | train stage | plain loop | stage / loop |")
    print("|---|---:|---:|---:|")
    for mark in rate_marks:
        s, p = stage[mark]["update"], peer[mark]["steps"]
        print(f"| updates at {mark:g} min | {s:,} | {p:,} | {s / max(p, 1):.2f}x |")
    print(f"| updates per minute, minutes {first:g}-{last:g} | {stage_rate:.1f} | {peer_rate:.1f} | "
          f"{stage_rate / peer_rate:.2f}x |")  # fmt: skip
    s_tok, p_tok = stage[last]["tokens"] / (last * 60), peer[last]["tokens"] / (last * 60)
    print(f"| target tokens/s over the {last:g} minutes | {s_tok:,.0f} | {p_tok:,.0f} | {s_tok / p_tok:.2f}x |")
    for mark in args.marks:
        s, p = bleu[("stage", mark)], bleu[("loop", mark)]
        print(f"| test BLEU at {mark:g} min | {s:.2f} | {p:.2f} | {s - p:+.2f} |")
    time_s = metrics["time_s"]
    around = 1.0 - time_s.get("steps", 0.0) / stage_wall
    print(
        f"\nthe stage's process: {stage_wall:.1f} s; its steps {time_s.get('steps', 0.0):.1f} s; "
        f"work around the step {100 * around:.1f}% of the wall time, start-up included"
    )
    print("time_s: " + ", ".join(f"{k} {v:g}" for k, v in time_s.items()))
    if args.json:
        figures = {"stage": {str(k): v for k, v in stage.items()}, "loop": {str(k): v for k, v in peer.items()}}
        figures |= {"bleu": {f"{who}@{m:g}": v for (who, m), v in bleu.items()}, "time_s": time_s}
        figures |= {"stage_wall_s": stage_wall, "updates_per_minute": {"stage": stage_rate, "loop": peer_rate}}
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
