"""Translate text with a standalone model file (what `average` writes): stdin or a file in, translations out.

    python -m pipeline.commands.translate --model models/average.pt < input.en > output.de
    translate --model models/average.pt --input input.en --beam 4 --alpha 0.6 --batch-tokens 8000
    translate --model a.pt b.pt < input.en        # an ensemble: the members' probabilities averaged each step
    translate --model models/average.pt --engine ctranslate2 --compute-type int8 < input.en

A command, not a stage: the text and the command line only. Sentences go through `pipeline.common.translator`
(sentencepiece) and the library's one inference path (`transformer.inference`), as in the decode stage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from pipeline.common.engines import ENGINES, make_translator
from pipeline.common.files import atomic_path, read_lines
from pipeline.common.inspection import Sample, cross_attention_figure, inspect_model
from pipeline.common.translator import Translator
from transformer.inference import SearchOptions


def chunks(stream: TextIO, size: int) -> Iterator[list[str]]:
    buffer: list[str] = []
    for line in stream:
        buffer.append(line.rstrip("\r\n"))
        if len(buffer) >= size:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def write_lines(lines: Iterable[str], out: TextIO) -> None:
    for line in lines:
        out.write(line.replace("\n", " ") + "\n")
    out.flush()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = SearchOptions()
    p = argparse.ArgumentParser(prog="translate", description="Translate sentences (one per line) with a model file.")
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        nargs="+",
        help="standalone model file, e.g. models/average.pt; several: an ensemble (probabilities averaged)",
    )
    p.add_argument("--input", type=Path, default=None, help="file of sentences (default: stdin)")
    p.add_argument("--beam", type=int, default=defaults.beam)
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="length penalty α (§6.1)")
    p.add_argument("--max-len-a", type=float, default=defaults.max_len_a)
    p.add_argument("--max-len-b", type=int, default=defaults.max_len_b)
    p.add_argument("--batch-tokens", type=int, default=defaults.max_tokens, help="padded source tokens per batch")
    p.add_argument("--buffer-size", type=int, default=None, help="lines read before translating (tty: 1)")
    p.add_argument("--spm", type=Path, default=None, help="sentencepiece model, if the model file has none")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto: cuda when available)")
    p.add_argument("--engine", choices=ENGINES, default="torch", help="torch (default) or ctranslate2")
    p.add_argument(
        "--compute-type", default="default", help="CTranslate2's: default (float32), int8, int8_float32, int16, ..."
    )
    p.add_argument("--ct2-inter-threads", type=int, default=0, help="CTranslate2's batches at once (0: auto)")
    p.add_argument("--ct2-max-batch-size", type=int, default=0, help="CTranslate2's sentences a batch (0: auto)")
    p.add_argument(
        "--show-attention",
        type=Path,
        default=None,
        metavar="OUT.png",
        help="translate one sentence and draw its decoder-encoder attention (every layer and head)",
    )
    args = p.parse_args(argv)
    if args.show_attention is not None and (len(args.model) > 1 or args.engine != "torch"):
        p.error("--show-attention draws one model's attention with the torch engine: give one --model")
    for name in ("beam", "batch_tokens", "max_len_b", "ct2_inter_threads", "ct2_max_batch_size"):
        least = 1 if name in ("beam", "batch_tokens") else 0
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}")
    return args


def draw_cross_attention(translator: Translator, sentence: str, out: Path) -> str:
    """Translate `sentence` with the translator's search and draw the cross-attention that produced the
    translation into the PNG `out` (`--show-attention`); returns the translation."""
    [found] = inspect_model(translator.model, translator.sp, [Sample(sentence, "")], search=translator.search)
    title = f"{sentence}\n→ {found.hypothesis}\ndecoder-encoder attention (rows: output tokens, columns: source)"
    fig = cross_attention_figure(found, title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return found.hypothesis


def show_attention(translator: Translator, args: argparse.Namespace) -> None:
    lines = read_lines(args.input) if args.input is not None else sys.stdin.read().splitlines()
    lines = [line for line in lines if line.strip()]
    if len(lines) != 1:
        sys.exit(f"translate: --show-attention draws one sentence; got {len(lines)} non-empty input lines")
    write_lines([draw_cross_attention(translator, lines[0], args.show_attention)], sys.stdout)
    print(f"decoder-encoder attention drawn to {args.show_attention}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    options = SearchOptions(args.beam, args.alpha, args.max_len_a, args.max_len_b, args.batch_tokens)
    translator = make_translator(
        args.model, options, args.device, args.engine, args.compute_type, args.spm,
        inter_threads=args.ct2_inter_threads, max_batch_size=args.ct2_max_batch_size,
    )  # fmt: skip
    if args.show_attention is not None:
        show_attention(translator, args)
        return
    if args.input is not None:
        write_lines(translator.translate(read_lines(args.input)), sys.stdout)
        return
    # Interactive use gets a translation per line; piped input is translated in large sorted batches.
    size = args.buffer_size or (1 if sys.stdin.isatty() else 10_000)
    for lines in chunks(sys.stdin, size):
        write_lines(translator.translate(lines), sys.stdout)


if __name__ == "__main__":
    main()
