"""The main job at full size, stage by stage: wall time, peak memory of each stage's whole process tree, throughput.

    python -m tools.full_size --corpus /data/wmt14-like --work /data/full-size

`--corpus` is a folder in the hub's wmt14 layout (`tools/make_wmt_like.py` writes one). In `--work`, a scratch
project (its own params.yaml, data/, models/, metrics/, MLflow store and datasets cache), the script runs the
stage commands of dvc.yaml, read from dvc.yaml itself, with params.yaml composed from conf/ by Hydra as
`dvc exp run -S preset=wmt14-base -S data.dataset=<corpus> [-S ...]` composes it:

1. download, learn_bpe, binarise (the wmt14-base preset: 37k BPE, max_len 250);
2. the train stage's start-up: the epoch's batch plan and the data put in Ray, timed in a process of their own,
   then the stage itself with 1 and 2 CPU workers (base model, `train.max_updates=1`; an update of base at 25k
   tokens takes minutes on 2 cores): stage start to the first update (`startup_s` in metrics/train.json), the
   first update, the driver's and each Ray worker's peak RSS, and Ray's object store;
3. average (the last checkpoint: weights after one update) and decode of the test split (3,003 sentences at
   WMT14 size), base, beam 4, on CPU. Random weights never choose eos, so every sentence runs to its maximum
   length: `--decode-cap source` (default) caps it at the source length (decode.max_len_b=0), about where a
   trained model stops; `--decode-cap paper` keeps the paper's source + 50.

Each stage's process tree (the stage, its worker pool, Ray's processes) is sampled every 0.2 s (tools/proc_tree.py).
Run it on an idle machine: with other jobs on the cores, torch's two OpenMP threads spin-wait for each other and
train and decode slow down several times over (measured at load 15 on 2 cores: the same 8 sentences decoded in
5 s with 1 thread and 40 s with 2); the JSON records the load average at each stage's start.
The script prints one markdown table with the targets of issue #17 and writes everything as JSON (`--out`).
`--stages` runs a subset against an existing --work (e.g. `--stages train decode`); `-S key=value` adds an
override to every stage (e.g. `-S bpe.vocab_size=8000` at small scale). Disk: the corpus about twice more
(datasets' Arrow cache, data/raw) plus data/bin; Ray's checkpoints of base about 0.8 GB per train run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tools.proc_tree import TreePeaks, wait_sampled

REPO = Path(__file__).resolve().parents[1]

STAGES = ("download", "learn_bpe", "binarise", "plan", "train", "decode")
GB = 1e9
TARGETS = {"data_minutes": 30.0, "data_peak_gb": 8.0, "binarise_pairs_per_s": 15_000, "startup_s": 60.0}


def stage_command(stage: str) -> list[str]:
    """The stage's `cmd` in dvc.yaml, run by this interpreter (DVC runs the `python` first on PATH)."""
    cmd = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    return [sys.executable, *cmd[1:]] if cmd[0] == "python" else cmd


def compose(work: Path, corpus: Path, overrides: list[str]) -> None:
    """params.yaml as `dvc exp run -S preset=wmt14-base -S data.dataset=<corpus> -S ...` composes it."""
    from dvc.utils.hydra import compose_and_dump

    base = ["preset=wmt14-base", f"data.dataset={corpus.resolve()}"]
    compose_and_dump(work / "params.yaml", str(REPO / "conf"), None, "config", str(work), base + overrides)


def environment(work: Path) -> dict[str, str]:
    return os.environ | {
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work.resolve()}/mlflow.db",
        "HF_DATASETS_CACHE": str(work.resolve() / "hf-cache"),  # a cold cache: the Arrow conversion is measured
        "HF_DATASETS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def run(name: str, cmd: list[str], work: Path) -> tuple[float, TreePeaks]:
    """Run one command in `work`, its output in logs/<name>.log; (wall seconds, peaks of its process tree). The
    CPU seconds of the tree (those of its processes that were waited for) go into `peaks.cpu_s`: on a shared
    machine they say what the work costs when the wall clock does not."""
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: (cd {work} && {shlex.join(cmd)}) > {log}", flush=True)
    start, cpu, load = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT, env=environment(work))
        code, peaks = wait_sampled(proc)
    wall = time.perf_counter() - start
    peaks.cpu_s, peaks.load = cpu_seconds() - cpu, load
    if code != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
        sys.exit(f"{name} failed (exit {code}) after {wall:.0f} s; the end of {log}:\n{tail}")
    return wall, peaks


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def memory(peaks: TreePeaks) -> dict:
    largest = peaks.largest()
    return {
        "cpu_s": round(peaks.cpu_s, 1),
        "load_at_start": round(peaks.load, 1),  # 1-minute load average: others' jobs on a shared machine
        "peak_tree_rss_gb": round(peaks.rss_sum / GB, 3),
        "peak_tree_private_gb": round(peaks.private_sum / GB, 3),
        "largest_process": largest.label,
        "largest_rss_gb": round(largest.rss / GB, 3),
        "samples": peaks.samples,
    }


def metrics(work: Path, stage: str) -> dict:
    return json.loads((work / "metrics" / f"{stage}.json").read_text(encoding="utf-8"))


def lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))


def data_stage(stage: str, work: Path) -> dict:
    wall, peaks = run(stage, stage_command(stage), work)
    raw = work / "data" / "raw"
    if stage == "learn_bpe":  # what it reads: both sides of train
        pairs, unit = lines(raw / "train.en"), "train pairs"
    else:  # download writes, binarise reads, every split
        pairs, unit = sum(lines(raw / f"{s}.en") for s in ("train", "valid", "test")), "pairs, all splits"
    row = {"stage": stage, "wall_s": round(wall, 1), "pairs": pairs, "unit": unit}
    row |= {"pairs_per_s": round(pairs / wall), **memory(peaks)}
    if stage in ("download", "binarise"):
        row["metrics"] = metrics(work, stage)
    return row


PLAN_PROGRAM = """
import json, resource, sys, time
t0 = time.perf_counter()
from pipeline.common.params import load_params
from pipeline.train import load_data
from transformer.batching import BatchPlan
train = load_params().train
t1 = time.perf_counter()
meta, data, valid = load_data(__import__("pathlib").Path("data/bin"))
arrays = data.to_arrays()
object_bytes = sum(a.nbytes for a in arrays.values()) + sum(a.nbytes for a in valid.to_arrays().values())
copy = {k: a.copy() for k, a in arrays.items()}  # what ray.put does: one pass over the memory-mapped tokens
t2 = time.perf_counter()
plan = BatchPlan(data.src_lengths, data.tgt_lengths, train.update_tokens, train.max_tokens, train.seed)
epoch = plan.epoch(1)
t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_data_s": t2 - t1, "batch_plan_s": t3 - t2, "pairs": len(data),
                  "global_batches": len(epoch), "object_store_data_gb": object_bytes / 1e9,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))
"""


def plan_stage(work: Path) -> dict:
    """What the driver and each worker do with the data before the first update, without Ray or a model."""
    wall, peaks = run("plan", [sys.executable, "-c", PLAN_PROGRAM], work)
    log = (work / "logs" / "plan.log").read_text(encoding="utf-8").strip().splitlines()[-1]
    parts = {k: round(v, 3) if isinstance(v, float) else v for k, v in json.loads(log).items()}
    return {"stage": "plan", "wall_s": round(wall, 1), **parts, **memory(peaks)}


def train_stage(work: Path, corpus: Path, overrides: list[str], workers: int, args) -> dict:
    cpus = max(1, args.cores // workers)
    compose(work, corpus, overrides + [
        f"train.workers={workers}", f"train.cpus_per_worker={cpus}", f"train.max_updates={args.updates}",
        f"train.use_gpu={'true' if args.gpu_train else 'false'}", "train.log_every_updates=1",
        "train.checkpoint_every_minutes=null", f"train.checkpoint_every_updates={args.updates}",
        "train.keep_checkpoints=1", "train.storage_path=runs/ray", f"train.run_name=startup-w{workers}",
    ])  # fmt: skip
    for old in (work / "runs" / "ray").glob(f"startup-w{workers}-*"):
        shutil.rmtree(old)  # else the stage would resume that run, already at max_updates
    wall, peaks = run(f"train-w{workers}", stage_command("train"), work)
    m = metrics(work, "train")
    ray_workers = peaks.by_label("ray::RayTrainWorker")
    top = sorted(peaks.processes.values(), key=lambda p: -p.rss)[:12]
    return {
        "stage": f"train, {workers} worker{'s' if workers > 1 else ''} x {cpus} CPU",
        "wall_s": round(wall, 1),
        "startup_s": m.get("startup_s"),
        "first_update_s": m.get("first_update_s"),
        "driver_rss_gb": round(peaks.root_peak().rss / GB, 3),
        "ray_worker_rss_gb": sorted(round(p.rss / GB, 3) for p in ray_workers),
        "object_store_gb": round(peaks.object_store / GB, 3),
        **memory(peaks),
        "cpu_s": None,  # Ray's processes are children of its raylet, not waited for by the stage: not counted
        "processes": [{"label": p.label, "rss_gb": round(p.rss / GB, 3)} for p in top],
    }


def decode_stage(work: Path, corpus: Path, overrides: list[str], args) -> list[dict]:
    cap = ["decode.max_len_a=1.0", "decode.max_len_b=0"] if args.decode_cap == "source" else []
    compose(work, corpus, overrides + ["average.last=1", "average.last_minutes=null", "average.last_share=null",
                                       "decode.device=cpu", *cap])  # fmt: skip
    rows = []
    wall, peaks = run("average", stage_command("average"), work)
    rows.append({"stage": "average", "wall_s": round(wall, 1), **memory(peaks)})
    cmd, raw = stage_command("decode"), work / "data" / "raw"
    if args.decode_sentences:  # the first N test sentences, in a raw folder of their own
        raw = work / "decode-raw"
        raw.mkdir(exist_ok=True)
        with open(work / "data" / "raw" / "test.en", encoding="utf-8") as f:
            head = [line for _, line in zip(range(args.decode_sentences), f, strict=False)]
        (raw / "test.en").write_text("".join(head), encoding="utf-8")
        cmd = [str(raw) if prev == "--raw" else a for prev, a in zip(["", *cmd[:-1]], cmd, strict=True)]
    wall, peaks = run("decode", cmd, work)
    m = metrics(work, "decode")
    rows.append({"stage": f"decode ({args.decode_cap} cap)", "wall_s": round(wall, 1), "sentences": m["sentences"],
                 "sentences_per_s": m["sentences_per_second"], "device": m["device"], **memory(peaks)})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """One markdown table: a row per stage, blank where a column does not apply."""
    cols = [("stage", "stage"), ("wall_s", "wall s"), ("cpu_s", "CPU s"), ("load_at_start", "load"), ("pairs", "pairs"),
            ("pairs_per_s", "pairs/s"), ("sentences_per_s", "sentences/s"), ("startup_s", "start-up s"),
            ("first_update_s", "1st update s"), ("peak_tree_rss_gb", "tree RSS GB"),
            ("peak_tree_private_gb", "tree private GB"), ("largest_process", "largest process"),
            ("largest_rss_gb", "its RSS GB"), ("driver_rss_gb", "driver GB"), ("ray_worker_rss_gb", "Ray workers GB"),
            ("object_store_gb", "object store GB")]  # fmt: skip

    def cell(row: dict, key: str) -> str:
        v = row.get(key)
        if v is None:
            return ""
        if key == "stage" and row["stage"] == "plan":
            return f"plan: load_data {row['load_data_s']} s + batch plan {row['batch_plan_s']} s"
        return f"{v:,}" if isinstance(v, int) else ", ".join(map(str, v)) if isinstance(v, list) else str(v)

    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r, k) for k, _ in cols) + " |" for r in rows]
    return "\n".join(out)


def checks(rows: list[dict]) -> dict:
    """The targets of issue #17 against what was measured (None where the stage did not run)."""
    by = {r["stage"]: r for r in rows}
    data = [by[s] for s in ("download", "learn_bpe", "binarise") if s in by]
    out = {}
    if len(data) == 3:
        minutes = sum(r["wall_s"] for r in data) / 60
        peak = max(r["peak_tree_rss_gb"] for r in data)
        out["data stages <= 30 min"] = (round(minutes, 1), minutes <= TARGETS["data_minutes"])
        out["data stages peak tree RSS <= 8 GB"] = (peak, peak <= TARGETS["data_peak_gb"])
    if "binarise" in by:
        rate = by["binarise"]["pairs_per_s"]
        out["binarise >= 15,000 pairs/s"] = (rate, rate >= TARGETS["binarise_pairs_per_s"])
    for r in rows:
        if r.get("startup_s") is not None:
            out[f"{r['stage']}: start-up <= 60 s"] = (r["startup_s"], r["startup_s"] <= TARGETS["startup_s"])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, required=True, help="folder in the hub's wmt14 layout")
    p.add_argument("--work", type=Path, required=True, help="scratch project folder (created)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("-S", dest="overrides", action="append", default=[], help="override, e.g. bpe.vocab_size=8000")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray train workers to start with")
    p.add_argument("--updates", type=int, default=1, help="train.max_updates of each train run")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="CPUs shared by the workers")
    p.add_argument("--gpu-train", action="store_true", help="train.use_gpu=true (default: CPU workers)")
    p.add_argument("--decode-cap", choices=("source", "paper"), default="source")
    p.add_argument("--decode-sentences", type=int, default=None, help="decode the first N test sentences only")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: <work>/full_size.json)")
    return p.parse_args(argv)


ORDER = ("download", "learn_bpe", "binarise", "plan", "train", "average", "decode")


class Results:
    """The rows measured so far, in `out`, rewritten after every stage: a crash keeps what was measured, and a
    later `--stages` run on the same corpus and overrides replaces its own rows and keeps the others."""

    def __init__(self, out: Path, corpus: Path, overrides: list[str]):
        self.out, self.meta = out, {"corpus": str(corpus.resolve()), "overrides": overrides}
        previous = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
        same = all(previous.get(k) == v for k, v in self.meta.items())
        self.rows: list[dict] = previous.get("rows", []) if same else []

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows = [r for r in self.rows if r["stage"] != row["stage"]] + [row]
        self.rows.sort(key=lambda r: next(i for i, s in enumerate(ORDER) if r["stage"].startswith(s)))
        machine = f"{platform.node()}, {len(os.sched_getaffinity(0))} cores, {os.cpu_count()} CPUs"
        targets = {k: {"measured": v, "met": ok} for k, (v, ok) in checks(self.rows).items()}
        result = self.meta | {"machine": machine, "rows": self.rows, "targets": targets}
        self.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = Results(args.out or work / "full_size.json", args.corpus, args.overrides)
    compose(work, args.corpus, args.overrides)
    for stage in ("download", "learn_bpe", "binarise"):
        if stage in args.stages:
            if stage == "download":
                shutil.rmtree(work / "hf-cache", ignore_errors=True)
            results.add([data_stage(stage, work)])
    if "plan" in args.stages:
        results.add([plan_stage(work)])
    if "train" in args.stages:
        for w in args.workers:
            results.add([train_stage(work, args.corpus, args.overrides, w, args)])
    if "decode" in args.stages:
        results.add(decode_stage(work, args.corpus, args.overrides, args))
    overrides = " ".join("-S " + o for o in args.overrides) or "wmt14-base as is"
    print(f"\n{args.corpus} ({overrides}); {platform.node()}, {len(os.sched_getaffinity(0))} cores; the load "
          "average at each stage's start is in the JSON (load_at_start)\n")  # fmt: skip
    print(table(results.rows))
    print()
    for name, (value, ok) in checks(results.rows).items():
        print(f"- {name}: {value:,} -> {'met' if ok else 'NOT met'}")
    print(f"\nJSON: {results.out}")


if __name__ == "__main__":
    main()
