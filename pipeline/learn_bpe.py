"""`learn_bpe`: one joint sentencepiece BPE model over the training source and target (§5.1: a shared
source-target vocabulary of about 37,000 tokens).

    python -m pipeline.learn_bpe --raw data/raw --out data/bpe

Writes `<out>/spm.model` and `<out>/spm.vocab` atomically, with ids pad=0 unk=1 bos=2 eos=3.

When the training text has more than `bpe.input_sentence_size` lines, we sample that many ourselves with
`bpe.seed`: sentencepiece 0.2.3's own sampling (`shuffle_input_sentence`) draws a different sample in every
process whatever `set_random_generator_seed` says (measured), which would make `dvc repro` learn a different
vocabulary each time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from pipeline.atomic import atomic_path
from pipeline.params import BpeParams, load_params

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


def sample_lines(inputs: list[Path], size: int, seed: int) -> Iterator[str] | None:
    """`size` lines drawn without replacement (seeded) from all of `inputs`; None if they have no more."""
    total = sum(count_lines(p) for p in inputs)
    if total <= size:
        return None
    keep = np.zeros(total, dtype=bool)
    keep[np.random.default_rng(seed).choice(total, size=size, replace=False)] = True

    def lines() -> Iterator[str]:
        i = 0
        for path in inputs:
            with open(path, encoding="utf-8", newline="\n") as f:
                for line in f:
                    if keep[i]:
                        yield line.rstrip("\n")
                    i += 1

    return lines()


def learn_bpe(raw: Path | str, out: Path | str, src: str, tgt: str, bpe: BpeParams, verbose=False) -> Path:
    """Train `<out>/spm.model`; the folder appears only once the model is complete."""
    inputs = train_inputs(Path(raw), src, tgt)
    sample = sample_lines(inputs, bpe.input_sentence_size, bpe.seed)
    source = {"input": [str(p) for p in inputs]} if sample is None else {"sentence_iterator": sample}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        try:
            spm.SentencePieceTrainer.train(
                **source,
                model_prefix=str(tmp / "spm"),
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
        make_reproducible(tmp / "spm.model")
    return Path(out) / "spm.model"


def make_reproducible(model: Path) -> None:
    """Drop what the model records about this run only (its temporary folder, the core count), so the
    same data and params give the same bytes, hence the same DVC hash, on any machine."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.trainer_spec.model_prefix = "spm"
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
    try:
        model = learn_bpe(args.raw, args.out, params.data.source_lang, params.data.target_lang, params.bpe,
                          verbose=args.verbose)  # fmt: skip
    except BpeError as e:
        sys.exit(f"learn_bpe: {e}")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    print(f"{model}: {sp.get_piece_size()} pieces (bpe.vocab_size {params.bpe.vocab_size})")


if __name__ == "__main__":
    main()
