"""`learn_bpe`: one joint sentencepiece BPE model over the training source and target (§5.1: a shared
source-target vocabulary of about 37,000 tokens).

    python -m pipeline.learn_bpe --raw data/raw --out data/bpe

Writes `<out>/spm.model` and `<out>/spm.vocab` atomically, with ids pad=0 unk=1 bos=2 eos=3.

When the training text has more than `bpe.input_sentence_size` lines, we sample that many ourselves with
`bpe.seed`: sentencepiece 0.2.3's own sampling (`shuffle_input_sentence`) draws a different sample in every
process whatever `set_random_generator_seed` says (measured), which would make `dvc repro` learn a different
vocabulary each time. Sentencepiece holds every sentence it learns from in memory (about 0.6 GB per million
WMT-like lines, see `BpeParams`), hence the sample.

Lines longer than sentencepiece's `max_sentence_length` (4,192 bytes) it would skip without a word at our log
level; we skip them ourselves and say how many. They are crawl junk of 600+ words, which the binarise stage
drops anyway (`binarise.max_len`), so leaving them out of the BPE model costs nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from pipeline.common.files import atomic_path
from pipeline.common.layout import SPM_FILE, SPM_PREFIX
from pipeline.common.params import BpeParams, load_params
from pipeline.common.tracking import stage_run

MAX_SENTENCE_BYTES = 4192  # sentencepiece's max_sentence_length (its default), passed explicitly
TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


class BpeError(RuntimeError):
    """The BPE model cannot be learned as configured; the message names the key to change."""


def train_inputs(raw: Path, src: str, tgt: str) -> list[Path]:
    inputs = [raw / f"train.{src}", raw / f"train.{tgt}"]
    for path in inputs:
        if not path.exists():
            raise BpeError(f"{path}: not found (run the download stage first)")
    return inputs


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))


@dataclass
class Sample:
    """The training lines sentencepiece learns from: all of them, or `size` drawn without replacement (seeded),
    in file order; lines over MAX_SENTENCE_BYTES are left out and counted in `too_long` as they go by."""

    inputs: list[Path]
    total: int
    size: int
    seed: int
    too_long: int = 0

    def __iter__(self) -> Iterator[str]:
        keep = None
        if self.size < self.total:
            keep = np.zeros(self.total, dtype=bool)
            keep[np.random.default_rng(self.seed).choice(self.total, size=self.size, replace=False)] = True
        i = 0
        for path in self.inputs:
            with open(path, encoding="utf-8", newline="\n") as f:
                for line in f:
                    if keep is None or keep[i]:
                        line = line.rstrip("\n")
                        # Bytes >= characters, and <= 4 per character: encode only where it can matter.
                        if len(line) > MAX_SENTENCE_BYTES // 4 and len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                            self.too_long += 1
                        else:
                            yield line
                    i += 1


def sample_lines(inputs: list[Path], size: int, seed: int) -> Sample:
    total = sum(count_lines(p) for p in inputs)
    return Sample(inputs, total, min(size, total), seed)


def learn_bpe(raw: Path | str, out: Path | str, src: str, tgt: str, bpe: BpeParams, verbose=False) -> Sample:
    """Train `<out>/spm.model`; the folder appears only once the model is complete. Returns what it learned from
    (lines in all, sampled, skipped as too long)."""
    inputs = train_inputs(Path(raw), src, tgt)
    sample = sample_lines(inputs, bpe.input_sentence_size, bpe.seed)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample),
                max_sentence_length=MAX_SENTENCE_BYTES,
                model_prefix=str(tmp / SPM_PREFIX),
                model_type="bpe",
                vocab_size=bpe.vocab_size,
                character_coverage=bpe.character_coverage,
                input_sentence_size=bpe.input_sentence_size,  # no more than we pass: no sampling of its own
                shuffle_input_sentence=False,
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                num_threads=os.cpu_count() or 1,
                minloglevel=0 if verbose else 2,
            )
        except RuntimeError as e:
            raise too_high(e, bpe.vocab_size) or e from None
        make_reproducible(tmp / SPM_FILE)
    return sample


def make_reproducible(model: Path) -> None:
    """Drop what the model records about this run only (its temporary folder, the core count), so the
    same data and params give the same bytes, hence the same DVC hash, on any machine."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.trainer_spec.model_prefix = SPM_PREFIX
    proto.trainer_spec.ClearField("num_threads")
    model.write_bytes(proto.SerializeToString())


def too_high(error: RuntimeError, vocab_size: int) -> BpeError | None:
    """Sentencepiece's "Vocabulary size too high", said in terms of our params."""
    match = TOO_HIGH.search(str(error))
    if not match:
        return None
    limit = int(match.group(2))
    return BpeError(
        f"bpe.vocab_size {vocab_size} in params.yaml is more than this training corpus supports: at most "
        f"{limit} BPE pieces can be learned from it. Set bpe.vocab_size <= {limit} (e.g. "
        f"`dvc exp run -S bpe.vocab_size={limit}`) or train on more data."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Learn a joint sentencepiece BPE model.")
    parser.add_argument("--raw", type=Path, required=True, help="folder with train.<src> and train.<tgt>")
    parser.add_argument("--out", type=Path, required=True, help="folder for spm.model and spm.vocab")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    with stage_run("learn_bpe", params, ("data", "bpe")):
        try:
            sample = learn_bpe(args.raw, args.out, params.data.source_lang, params.data.target_lang, params.bpe,
                               verbose=args.verbose)  # fmt: skip
        except BpeError as e:
            sys.exit(f"learn_bpe: {e}")
        model = args.out / SPM_FILE
        mlflow.log_artifact(str(model), artifact_path="bpe")
        learned = {"input_lines": sample.total, "sampled_lines": sample.size, "too_long_lines": sample.too_long}
        mlflow.log_metrics(learned)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    print(f"{model}: {sp.get_piece_size()} pieces (bpe.vocab_size {params.bpe.vocab_size}), learned from "
          f"{sample.size - sample.too_long:,} of {sample.total:,} training lines (bpe.input_sentence_size "
          f"{params.bpe.input_sentence_size:,}); {sample.too_long:,} sampled lines longer than "
          f"{MAX_SENTENCE_BYTES:,} bytes left out (binarise drops such pairs by binarise.max_len)")  # fmt: skip


if __name__ == "__main__":
    main()
