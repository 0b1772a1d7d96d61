"""`binarise`: every split encoded with the BPE model into memory-mapped token arrays (transformer/corpus.py).

    python -m pipeline.binarise --raw data/raw --bpe data/bpe --out data/bin

Each sentence ends with eos and carries no bos. Training pairs (only those) are filtered like fairseq's
`clean-corpus-n.perl` in prepare-wmt14en2de.sh: a side longer than `binarise.max_len` BPE tokens (eos not
counted), a length ratio above `binarise.max_len_ratio`, or an empty side; valid and test stay line-aligned
with data/raw, which decode and score rely on. Chunks of lines are encoded by a pool of
`binarise.workers` processes (0: every core); see bench/binarise.py for why processes and not
sentencepiece's own threads. `metrics/binarise.json` has per split the pairs, tokens, unknowns and what was
dropped by reason.

BPE-dropout (`binarise.bpe_dropout` > 0, opt-in): the kept training pairs are encoded `binarise.sampled_copies`
times more with sentencepiece's sampling, into the `train_sampled` split, copy after copy; training then takes
one copy per epoch in turn. Each chunk of each copy is seeded from (sampling_seed, copy, chunk, side), so the
copies do not depend on the number of worker processes and `dvc repro` reproduces them byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from pipeline.common.files import atomic_path, file_sha256, write_text_atomic
from pipeline.common.layout import SPM_FILE
from pipeline.common.params import BinariseParams, load_params
from pipeline.common.tracking import log_stage_metrics, stage_run
from transformer.corpus import SAMPLED_SPLIT, SPECIAL_IDS, UNK_ID, SideWriter, token_dtype, write_meta

SPLITS = ("train", "valid", "test")
CHUNK = 20_000  # lines per task: large enough to amortise pickling, small enough to bound memory
DROP_REASONS = ("empty", "too_long", "ratio")


class BinariseError(RuntimeError):
    """Inputs that cannot be binarised, with the file named."""


@dataclass(frozen=True)
class Filter:
    """Training-pair filter; lengths are BPE tokens without eos."""

    max_len: int
    max_len_ratio: float

    def reasons(self, src_len: np.ndarray, tgt_len: np.ndarray) -> dict[str, np.ndarray]:
        """A boolean mask per reason, exclusive and in order: a pair is counted under its first reason."""
        empty = (src_len == 0) | (tgt_len == 0)
        too_long = ~empty & ((src_len > self.max_len) | (tgt_len > self.max_len))
        longer, shorter = np.maximum(src_len, tgt_len), np.maximum(np.minimum(src_len, tgt_len), 1)
        ratio = ~empty & ~too_long & (longer > self.max_len_ratio * shorter)
        return {"empty": empty, "too_long": too_long, "ratio": ratio}


@dataclass
class Chunk:
    """Encoded pairs, flattened: `src` holds the ids of every kept source sentence back to back."""

    src: np.ndarray
    src_lengths: np.ndarray
    tgt: np.ndarray
    tgt_lengths: np.ndarray
    lines: int
    dropped: dict[str, int]
    kept: np.ndarray | None = None  # which of the chunk's lines these pairs are (filtered chunks only)


_processor: spm.SentencePieceProcessor | None = None


def init_worker(model: str) -> None:
    global _processor
    _processor = spm.SentencePieceProcessor(model_file=model)


def encode(sentences: list[str], dtype: np.dtype, **sampling) -> tuple[list[np.ndarray], np.ndarray]:
    # One thread: with sampling, sentencepiece's threads would draw in an order that varies from run to run.
    ids = _processor.encode(sentences, out_type="numpy", add_eos=True, num_threads=1, **sampling)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return ids, lengths


def encode_chunk(task: tuple[list[str], list[str], Filter | None, str]) -> Chunk:
    """Encode one chunk of pairs (in a worker process) and drop the pairs the filter rejects."""
    sources, targets, keep_filter, dtype = task
    src_ids, src_lengths = encode(sources, dtype)
    tgt_ids, tgt_lengths = encode(targets, dtype)
    keep = np.ones(len(sources), dtype=bool)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    if keep_filter is not None:
        for reason, mask in keep_filter.reasons(src_lengths - 1, tgt_lengths - 1).items():
            dropped[reason] = int(mask.sum())
            keep &= ~mask
    kept = np.flatnonzero(keep)
    return Chunk(
        src=flatten([src_ids[i] for i in kept], dtype),
        src_lengths=src_lengths[kept],
        tgt=flatten([tgt_ids[i] for i in kept], dtype),
        tgt_lengths=tgt_lengths[kept],
        lines=len(sources),
        dropped=dropped,
        kept=kept,
    )


def encode_sampled_chunk(task: tuple[list[str], list[str], float, tuple[int, int], str]) -> Chunk:
    """Encode one chunk of kept pairs with BPE-dropout; each side's draws start from its own seed."""
    sources, targets, alpha, seeds, dtype = task
    sides = []
    for sentences, seed in zip((sources, targets), seeds, strict=True):
        spm.set_random_generator_seed(seed)
        sides.append(encode(sentences, dtype, enable_sampling=True, alpha=alpha, nbest_size=-1))
    (src_ids, src_lengths), (tgt_ids, tgt_lengths) = sides
    return Chunk(
        src=flatten(src_ids, dtype),
        src_lengths=src_lengths,
        tgt=flatten(tgt_ids, dtype),
        tgt_lengths=tgt_lengths,
        lines=len(sources),
        dropped=dict.fromkeys(DROP_REASONS, 0),
    )


def flatten(arrays: list[np.ndarray], dtype: str) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))


def read_chunks(src_path: Path, tgt_path: Path) -> Iterator[tuple[list[str], list[str]]]:
    """Aligned chunks of lines from the two sides of a split."""
    # newline="\n": a stray \r inside a line must not split it (count_lines counts \n only).
    with (
        open(src_path, encoding="utf-8", newline="\n") as fs,
        open(tgt_path, encoding="utf-8", newline="\n") as ft,
    ):
        while True:
            sources = [line.rstrip("\n") for line in itertools.islice(fs, CHUNK)]
            targets = [line.rstrip("\n") for line in itertools.islice(ft, CHUNK)]
            if not sources and not targets:
                return
            yield sources, targets


def split_paths(raw: Path, split: str, src: str, tgt: str) -> tuple[Path, Path, int]:
    paths = raw / f"{split}.{src}", raw / f"{split}.{tgt}"
    for path in paths:
        if not path.exists():
            raise BinariseError(f"{path}: not found (run the download stage first)")
    counts = [count_lines(p) for p in paths]
    if counts[0] != counts[1]:
        raise BinariseError(f"split '{split}': {paths[0]} has {counts[0]} lines but {paths[1]} has {counts[1]}")
    return *paths, counts[0]


def binarise_split(pool, raw: Path, out: Path, split: str, langs: tuple, keep_filter, dtype, kept=None) -> dict:
    """Encode one split into `<out>/<split>.<lang>.{bin,idx.npy}`; return its statistics. `kept`, a list, gets
    the indices of each chunk's kept pairs (what BPE-dropout's copies encode again)."""
    src_path, tgt_path, lines = split_paths(raw, split, *langs)
    tasks = ((s, t, keep_filter, dtype.str) for s, t in read_chunks(src_path, tgt_path))
    return write_split(pool(encode_chunk, tasks), out, split, langs, dtype, lines, src_path, kept)


def binarise_sampled(pool, raw: Path, out: Path, langs: tuple, kept: list, params: BinariseParams, dtype) -> dict:
    """BPE-dropout: `sampled_copies` sampled encodings of the kept training pairs, copy after copy, as one split."""
    src_path, tgt_path, _ = split_paths(raw, "train", *langs)
    copies = params.sampled_copies

    def tasks():
        for copy in range(copies):
            for n, ((sources, targets), keep) in enumerate(zip(read_chunks(src_path, tgt_path), kept, strict=True)):
                seeds = np.random.SeedSequence([params.sampling_seed, copy, n]).generate_state(2)  # a side each
                pairs = [sources[i] for i in keep], [targets[i] for i in keep]
                yield *pairs, params.bpe_dropout, (int(seeds[0]), int(seeds[1])), dtype.str

    total = copies * sum(len(k) for k in kept)
    stats = write_split(pool(encode_sampled_chunk, tasks()), out, SAMPLED_SPLIT, langs, dtype, total, src_path)
    return stats | {"copies": copies, "bpe_dropout": params.bpe_dropout}


def write_split(chunks, out: Path, split: str, langs: tuple, dtype, lines: int, src_path: Path, kept=None) -> dict:
    """Write encoded chunks, in order, as `<out>/<split>.<lang>.{bin,idx.npy}`; return the split's statistics."""
    src, tgt = langs
    writers = SideWriter(out, split, src, dtype), SideWriter(out, split, tgt, dtype)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    unk = [0, 0]
    bar = tqdm(total=lines, desc=f"binarise {split}", unit=" pairs", mininterval=2.0)
    # However this ends, the files are closed here: on an error an open file would keep its disk blocks after
    # atomic_path removes the folder (a full disk would stay full until the exception is collected).
    with bar, contextlib.ExitStack() as on_error:
        for w in writers:
            on_error.callback(w.abort)
        for chunk in chunks:
            sides = [(chunk.src, chunk.src_lengths), (chunk.tgt, chunk.tgt_lengths)]
            for side, (tokens, lengths) in enumerate(sides):
                writers[side].append(tokens, lengths)
                unk[side] += int(np.count_nonzero(tokens == UNK_ID))
            for reason, n in chunk.dropped.items():
                dropped[reason] += n
            if kept is not None:
                kept.append(chunk.kept)
            bar.update(chunk.lines)
        src_lengths, tgt_lengths = (w.close() for w in writers)
    pairs = len(src_lengths)
    if pairs == 0:
        raise BinariseError(f"split '{split}': no pairs left of {lines} in {src_path} (dropped: {dropped})")
    return {
        "pairs": pairs,
        "tokens": {src: int(src_lengths.sum()), tgt: int(tgt_lengths.sum())},  # eos included
        "mean_tokens": {src: float(src_lengths.mean()), tgt: float(tgt_lengths.mean())},
        "unk": {src: unk[0], tgt: unk[1]},
        "dropped": dropped,
    }


def load_model(bpe: Path) -> tuple[Path, spm.SentencePieceProcessor]:
    model = bpe / SPM_FILE
    if not model.exists():
        raise BinariseError(f"{model}: not found (run the learn_bpe stage first)")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    if ids != SPECIAL_IDS:
        raise BinariseError(f"{model}: special ids {ids}, expected {SPECIAL_IDS} (retrain it with learn_bpe)")
    return model, sp


def binarise(raw, bpe, out, src: str, tgt: str, params: BinariseParams) -> dict:
    """Binarise every split into `out` atomically; return the statistics for metrics/binarise.json."""
    raw, out = Path(raw), Path(out)
    model, sp = load_model(Path(bpe))
    dtype = token_dtype(sp.get_piece_size())
    keep_filter = Filter(params.max_len, params.max_len_ratio)
    workers = params.workers or len(os.sched_getaffinity(0))
    stats = {}
    with disk_full_said(out), atomic_path(out) as tmp, worker_pool(str(model), workers) as pool:
        tmp.mkdir()
        kept: list[np.ndarray] = []
        for split in SPLITS:
            split_filter, split_kept = (keep_filter, kept) if split == "train" else (None, None)
            stats[split] = binarise_split(pool, raw, tmp, split, (src, tgt), split_filter, dtype, split_kept)
        sampled = {}
        if params.bpe_dropout > 0:
            stats[SAMPLED_SPLIT] = binarise_sampled(pool, raw, tmp, (src, tgt), kept, params, dtype)
            sampled = {"train_copies": params.sampled_copies, "bpe_dropout": params.bpe_dropout}
        write_meta(tmp, {
            "vocab_size": sp.get_piece_size(),
            "dtype": dtype.name,
            "langs": {"source": src, "target": tgt},
            "special_ids": SPECIAL_IDS,
            "spm_model_sha256": file_sha256(model),
            "splits": {split: s["pairs"] for split, s in stats.items()},
            **sampled,
        })  # fmt: skip
    return stats


@contextlib.contextmanager
def disk_full_said(out: Path):
    """A full disk (ENOSPC, or a quota: EDQUOT) said as what to do; atomic_path has removed the partial folder
    by the time this runs, so nothing half-written is left for a later stage to trust."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = out / Path(e.filename).name if e.filename else out  # the file's final name, not its temporary one
        free = shutil.disk_usage(out.resolve().parent).free
        free_text = f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"
        raise BinariseError(
            f"{where}: no space left on the device ({e.strerror}); the partial output was removed and {out} is as "
            f"it was. {free_text} free there now; the token arrays take about 2 bytes a BPE token (0.6 GB for the "
            "WMT14-sized rehearsal corpus). Free space on that disk, or point the stage elsewhere: run the pipeline "
            f"from a disk with room, or make {out.parent} a symlink to one (DVC's cache, `dvc cache dir`, needs as "
            "much again)"
        ) from None


class worker_pool:  # noqa: N801 -- used like a function: `with worker_pool(model, n) as imap:`
    """An ordered `imap` over `workers` processes that each load the model once; in-process for one."""

    def __init__(self, model: str, workers: int):
        self.model, self.workers, self.pool = model, workers, None

    def __enter__(self):
        if self.workers == 1:
            init_worker(self.model)
            return map
        self.pool = multiprocessing.Pool(self.workers, initializer=init_worker, initargs=(self.model,))
        return lambda fn, tasks: self.pool.imap(fn, tasks)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Encode the corpus into memory-mapped token arrays.")
    parser.add_argument("--raw", type=Path, required=True, help="folder with {train,valid,test}.<lang>")
    parser.add_argument("--bpe", type=Path, required=True, help="folder with spm.model")
    parser.add_argument("--out", type=Path, required=True, help="folder for the token arrays and meta.json")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/binarise.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    src, tgt = params.data.source_lang, params.data.target_lang
    with stage_run("binarise", params, ("data", "binarise")):
        try:
            stats = binarise(args.raw, args.bpe, args.out, src, tgt, params.binarise)
        except BinariseError as e:
            sys.exit(f"binarise: {e}")
        write_text_atomic(args.metrics, json.dumps(stats, indent=2) + "\n")
        log_stage_metrics(stats)
    for split, s in stats.items():
        dropped = ", ".join(f"{n} {reason}" for reason, n in s["dropped"].items() if n) or "none"
        tokens = f"{s['tokens'][src]} + {s['tokens'][tgt]} tokens"
        print(f"{split}: {s['pairs']} pairs, {tokens}; dropped: {dropped}")


if __name__ == "__main__":
    main()
