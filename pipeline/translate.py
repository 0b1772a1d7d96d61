"""Translate text with a standalone model file (what `average` writes): stdin or a file in, translations out.

    python -m pipeline.translate --model models/average.pt < input.en > output.de
    translate --model models/average.pt --input input.en --beam 4 --alpha 0.6 --batch-tokens 8000

`Translator` is the one inference path: the `decode` stage, this command and the MLflow pyfunc model all use
it. Sentences are encoded with the model's own sentencepiece model (+ eos), grouped into batches by a budget
of padded source tokens after sorting by length, searched with beams (§6.1), detokenised with sentencepiece
and returned in input order.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import sentencepiece as spm
import torch

from pipeline.params import DecodeParams
from transformer import EOS_ID, PAD_ID
from transformer.checkpoint import load_model
from transformer.model import Transformer
from transformer.search import beam_search


@dataclass(frozen=True)
class SearchOptions:
    """§6.1: beam 4, length penalty α = 0.6, maximum output length = input length + 50."""

    beam: int = 4
    alpha: float = 0.6
    max_len_a: float = 1.0
    max_len_b: int = 50
    max_tokens: int = 8000  # padded source tokens per batch


def search_options(d: DecodeParams) -> SearchOptions:
    """The `decode` section of params.yaml as search options (the decode and curve stages)."""
    return SearchOptions(
        beam=d.beam, alpha=d.alpha, max_len_a=d.max_len_a, max_len_b=d.max_len_b, max_tokens=d.max_tokens
    )


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so that each batch's padded size (sentences × longest) stays within `max_tokens`.

    Longest first, so similar lengths share a batch (little padding) and an out-of-memory batch shows up at
    once rather than at the end. A sentence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest = max(longest, lengths[i])
        if current and longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], lengths[i]
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    src = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(sequences):
        src[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return src  # (B, S)


def sentencepiece_from(extra: dict, model_path: Path, spm_path: Path | None) -> spm.SentencePieceProcessor:
    """The BPE model embedded in the model file (checked against its sha256), else `spm_path`."""
    if spm_path is not None:
        return spm.SentencePieceProcessor(model_file=str(spm_path))
    bpe = extra.get("bpe") or {}
    proto = bpe.get("model_proto")
    if proto is None:
        raise ValueError(f"{model_path}: no sentencepiece model embedded in this file; pass its path (--spm)")
    data = proto.numpy().tobytes()
    if bpe.get("sha256") and hashlib.sha256(data).hexdigest() != bpe["sha256"]:
        raise ValueError(f"{model_path}: embedded sentencepiece model does not match its recorded sha256")
    return spm.SentencePieceProcessor(model_proto=data)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto` (or None): cuda when torch sees a GPU, else cpu; anything else as torch names it, checked here so
    that a missing GPU is said in one line before any model is loaded."""
    if name is None or name == "auto":
        return default_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device '{name}' asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
            "use decode.device: auto or cpu (translate: --device cpu)"
        )
    return device


class Translator:
    """A model and its sentencepiece model, translating lists of sentences in batches."""

    def __init__(self, model: Transformer, sp: spm.SentencePieceProcessor, options: SearchOptions):
        self.model, self.sp, self.options = model, sp, options
        self.device = next(model.parameters()).device
        if sp.get_piece_size() != model.cfg.vocab_size:
            raise ValueError(
                f"sentencepiece vocabulary ({sp.get_piece_size()}) differs from the model's ({model.cfg.vocab_size})"
            )

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        options: SearchOptions | None = None,
        device: str | torch.device | None = None,
        spm_path: str | Path | None = None,
    ) -> Translator:
        device = resolve_device(device)
        model, extra = load_model(path, map_location=device)
        sp = sentencepiece_from(extra, Path(path), Path(spm_path) if spm_path else None)
        return cls(model, sp, options or SearchOptions())

    def encode(self, sentence: str) -> list[int]:
        # The encoder has max_positions positions; a longer source keeps its beginning (and its eos).
        return self.sp.encode(sentence)[: self.model.cfg.max_positions - 1] + [EOS_ID]

    @torch.inference_mode()
    def search(self, sources: Sequence[Sequence[int]]) -> list[list[int]]:
        """Best hypothesis (token ids, no bos/eos) for each source, same order."""
        src = pad_batch(sources).to(self.device)
        o = self.options
        # bf16 autocast on GPUs only: CPUs here lack native bf16 and run it ~100× slower (STACK-FACTS).
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            nbest = beam_search(
                self.model, src, beam=o.beam, alpha=o.alpha, max_len_a=o.max_len_a, max_len_b=o.max_len_b, nbest=1
            )
        return [list(hyps[0].tokens) for hyps in nbest]

    def translate(self, sentences: Sequence[str], progress: Callable[[int], object] | None = None) -> list[str]:
        """Translations in input order; `progress(n)` is called after each batch of n sentences."""
        sources = [self.encode(s) for s in sentences]
        out: list[str] = [""] * len(sources)
        for batch in token_batches([len(s) for s in sources], self.options.max_tokens):
            for i, tokens in zip(batch, self.search([sources[i] for i in batch]), strict=True):
                out[i] = self.sp.decode(tokens)
            if progress is not None:
                progress(len(batch))
        return out


def read_lines(path: str | Path) -> list[str]:
    """Lines split on "\\n" only: `str.splitlines` would also split on U+2028 etc. and break line alignment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


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
    p.add_argument("--model", required=True, type=Path, help="standalone model file, e.g. models/average.pt")
    p.add_argument("--input", type=Path, default=None, help="file of sentences (default: stdin)")
    p.add_argument("--beam", type=int, default=defaults.beam)
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="length penalty α (§6.1)")
    p.add_argument("--max-len-a", type=float, default=defaults.max_len_a)
    p.add_argument("--max-len-b", type=int, default=defaults.max_len_b)
    p.add_argument("--batch-tokens", type=int, default=defaults.max_tokens, help="padded source tokens per batch")
    p.add_argument("--buffer-size", type=int, default=None, help="lines read before translating (tty: 1)")
    p.add_argument("--spm", type=Path, default=None, help="sentencepiece model, if the model file has none")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (default auto: cuda when available)")
    p.add_argument(
        "--show-attention",
        type=Path,
        default=None,
        metavar="OUT.png",
        help="translate one sentence and draw its decoder-encoder attention (every layer and head)",
    )
    args = p.parse_args(argv)
    for name in ("beam", "batch_tokens", "max_len_b"):
        if getattr(args, name) < (0 if name == "max_len_b" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def show_attention(translator: Translator, args: argparse.Namespace) -> None:
    # Imported here: inspection imports this module, and plain translation need not load matplotlib.
    from pipeline.inspection import draw_cross_attention

    lines = read_lines(args.input) if args.input is not None else sys.stdin.read().splitlines()
    lines = [line for line in lines if line.strip()]
    if len(lines) != 1:
        sys.exit(f"translate: --show-attention draws one sentence; got {len(lines)} non-empty input lines")
    write_lines([draw_cross_attention(translator, lines[0], args.show_attention)], sys.stdout)
    print(f"decoder-encoder attention drawn to {args.show_attention}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    options = SearchOptions(args.beam, args.alpha, args.max_len_a, args.max_len_b, args.batch_tokens)
    translator = Translator.from_file(args.model, options, device=args.device, spm_path=args.spm)
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
