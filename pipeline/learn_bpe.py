"""`learn_bpe`: one joint sentencepiece BPE model over the training source and target (§5.1: a shared
source-target vocabulary of about 37,000 tokens).

    python -m pipeline.learn_bpe --raw data/raw --out data/bpe

Writes `<out>/spm.model` and `<out>/spm.vocab` atomically, with ids pad=0 unk=1 bos=2 eos=3.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import sentencepiece as spm

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


def learn_bpe(raw: Path | str, out: Path | str, src: str, tgt: str, bpe: BpeParams, verbose=False) -> Path:
    """Train `<out>/spm.model`; the folder appears only once the model is complete."""
    inputs = train_inputs(Path(raw), src, tgt)
    # The sampling of input_sentence_size sentences (and nothing else) is random: seeding it makes the
    # model a function of the data and the params.
    spm.set_random_generator_seed(bpe.seed)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        try:
            spm.SentencePieceTrainer.train(
                input=[str(p) for p in inputs],
                model_prefix=str(tmp / "spm"),
                model_type="bpe",
                vocab_size=bpe.vocab_size,
                character_coverage=bpe.character_coverage,
                input_sentence_size=bpe.input_sentence_size,
                shuffle_input_sentence=True,
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                num_threads=os.cpu_count() or 1,
                minloglevel=0 if verbose else 2,
            )
        except RuntimeError as e:
            raise too_high(e, bpe.vocab_size) or e from None
    return Path(out) / "spm.model"


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
