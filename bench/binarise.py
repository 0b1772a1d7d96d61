"""Binarise throughput (sentence pairs/s) on 2 cores: our stage against two peers, in the same run.

    python -m bench.binarise [--multi30k ../shared/data/multi30k] [--repeat 7]

The corpus is Multi30k train repeated `--repeat` times (7: 203,000 pairs) plus its validation and test
splits, encoded with a 10k joint BPE model learned on it. Peers:
- naive: one process, a Python loop calling `sp.encode` per sentence and writing one array per sentence;
- sp threads: one process, sentencepiece's own batched `encode(..., num_threads=2)`, same writer as ours.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pipeline import binarise as bz
from pipeline.common.params import BinariseParams, BpeParams, DataParams
from pipeline.download import download
from pipeline.learn_bpe import learn_bpe
from transformer.corpus import EOS_ID, SideWriter

SRC, TGT = "en", "de"
PARAMS = BinariseParams(max_len=128, max_len_ratio=3.0, workers=2)  # the multi30k preset's filter


def prepare(root: Path, multi30k: Path, repeat: int) -> tuple[Path, Path]:
    raw = root / "raw"
    download(DataParams(dataset=str(multi30k), config=None), raw)
    learn_bpe(raw, root / "bpe", SRC, TGT, BpeParams(vocab_size=10000))
    for lang in (SRC, TGT):
        path = raw / f"train.{lang}"
        path.write_text(path.read_text(encoding="utf-8") * repeat, encoding="utf-8")
    return raw, root / "bpe"


def pairs_in(raw: Path) -> int:
    return sum(bz.count_lines(raw / f"{split}.{SRC}") for split in bz.SPLITS)


def ours(raw: Path, bpe: Path, out: Path) -> None:
    bz.binarise(raw, bpe, out, SRC, TGT, PARAMS)


def naive(raw: Path, bpe: Path, out: Path) -> None:
    """What one writes first: a loop over pairs, one encode call and one array per sentence."""
    sp = spm.SentencePieceProcessor(model_file=str(bpe / "spm.model"))
    out.mkdir()
    for split in bz.SPLITS:
        arrays = {SRC: [], TGT: []}
        with (
            open(raw / f"{split}.{SRC}", encoding="utf-8") as fs,
            open(raw / f"{split}.{TGT}", encoding="utf-8") as ft,
        ):
            for s, t in zip(fs, ft, strict=True):
                src, tgt = sp.encode(s.rstrip("\n")) + [EOS_ID], sp.encode(t.rstrip("\n")) + [EOS_ID]
                n, m = len(src) - 1, len(tgt) - 1
                if split == "train" and (
                    min(n, m) == 0 or max(n, m) > PARAMS.max_len or max(n, m) > PARAMS.max_len_ratio * max(min(n, m), 1)
                ):
                    continue
                arrays[SRC].append(np.array(src, dtype=np.uint16))
                arrays[TGT].append(np.array(tgt, dtype=np.uint16))
        for lang, sentences in arrays.items():
            np.savez(out / f"{split}.{lang}.npz", *sentences)


def sp_threads(raw: Path, bpe: Path, out: Path) -> None:
    """sentencepiece's batched encode with its own thread pool, in one process, our writer."""
    sp = spm.SentencePieceProcessor(model_file=str(bpe / "spm.model"))
    keep_filter = bz.Filter(PARAMS.max_len, PARAMS.max_len_ratio)
    out.mkdir()
    for split in bz.SPLITS:
        writers = SideWriter(out, split, SRC, np.uint16), SideWriter(out, split, TGT, np.uint16)
        for sources, targets in bz.read_chunks(raw / f"{split}.{SRC}", raw / f"{split}.{TGT}"):
            sides = [sp.encode(x, out_type="numpy", add_eos=True, num_threads=2) for x in (sources, targets)]
            lengths = [np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) for ids in sides]
            keep = np.ones(len(sources), dtype=bool)
            if split == "train":
                for mask in keep_filter.reasons(lengths[0] - 1, lengths[1] - 1).values():
                    keep &= ~mask
            for writer, ids, n in zip(writers, sides, lengths, strict=True):
                writer.append(bz.flatten([ids[i] for i in np.flatnonzero(keep)], "uint16"), n[keep])
        for writer in writers:
            writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multi30k", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # 2 cores, for us and the peers alike
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw, bpe = prepare(root, args.multi30k, args.repeat)
        pairs = pairs_in(raw)
        rows = []
        for name, fn in (("naive loop (1 process)", naive), ("sp threads (1 process)", sp_threads),
                         ("ours: process pool (2)", ours)):  # fmt: skip
            start = time.perf_counter()
            fn(raw, bpe, root / name.split()[0].rstrip(":"))
            rows.append((name, time.perf_counter() - start))
    base = pairs / rows[0][1]
    print(f"\nbinarise, {pairs:,} sentence pairs (Multi30k train x{args.repeat} + valid + test), 2 cores")
    print(f"{'method':<26}{'seconds':>9}{'pairs/s':>11}{'vs naive':>10}")
    for name, seconds in rows:
        print(f"{name:<26}{seconds:>9.2f}{pairs / seconds:>11,.0f}{pairs / seconds / base:>9.1f}x")


if __name__ == "__main__":
    main()
