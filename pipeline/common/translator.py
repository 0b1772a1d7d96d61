"""The text side of translation: a model file and its sentencepiece model, sentences in, sentences out.

`Translator` encodes sentences with the model's own sentencepiece model, hands the ids to the library's one
inference path (`transformer.inference.translate_ids`: batching, padding, the source cap, beam search, input
order) and detokenises the results. The decode and curve stages, the `translate` command and the MLflow model
use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from pipeline.common.params import DecodeParams
from transformer.batching import source_tokens
from transformer.checkpoint import load_model
from transformer.ensemble import Ensemble
from transformer.inference import SearchOptions, search_batch, translate_in_batches
from transformer.model import Transformer


def search_options(d: DecodeParams) -> SearchOptions:
    """The `decode` section of params.yaml as search options (the decode and curve stages)."""
    return SearchOptions(
        beam=d.beam, alpha=d.alpha, max_len_a=d.max_len_a, max_len_b=d.max_len_b, max_tokens=d.max_tokens
    )


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


def load_members(
    paths: Sequence[str | Path], device: torch.device, spm_path: Path | None
) -> tuple[Transformer | Ensemble, spm.SentencePieceProcessor]:
    """One model file, or several as an ensemble; the members must share the sentencepiece model (the one
    embedded in each file, compared by content) and the vocabulary."""
    models, sps, names = [], [], [str(p) for p in paths]
    for path in paths:
        model, extra = load_model(path, map_location=device)
        models.append(model)
        sps.append(sentencepiece_from(extra, Path(path), spm_path))
    for name, sp in zip(names[1:], sps[1:], strict=True):
        if sp.serialized_model_proto() != sps[0].serialized_model_proto():
            raise ValueError(
                f"{name} was trained with another sentencepiece model than {names[0]}: "
                "ensemble members must share one vocabulary"
            )
    return (models[0] if len(models) == 1 else Ensemble(models, names)), sps[0]


class Translator:
    """A model (or an ensemble) and its sentencepiece model, translating lists of sentences in batches."""

    def __init__(
        self,
        model: Transformer | Ensemble,
        sp: spm.SentencePieceProcessor,
        options: SearchOptions,
        search: Callable[[Sequence[Sequence[int]], SearchOptions], list[list[int]]] | None = None,
    ):
        """`search(sources, options)`: another engine's search of one batch of source ids with these settings
        (pipeline/common/engines.py); default this library's beam search over `model`."""
        self.model, self.sp, self.options, self.engine_search = model, sp, options, search
        self.device = next(model.parameters()).device
        if sp.get_piece_size() != model.cfg.vocab_size:
            raise ValueError(
                f"sentencepiece vocabulary ({sp.get_piece_size()}) differs from the model's ({model.cfg.vocab_size})"
            )

    @classmethod
    def from_file(
        cls,
        path: str | Path | Sequence[str | Path],
        options: SearchOptions | None = None,
        device: str | torch.device | None = None,
        spm_path: str | Path | None = None,
    ) -> Translator:
        """A model file, or a list of them: an ensemble (their probabilities averaged at every step)."""
        paths = [path] if isinstance(path, str | Path) else list(path)
        model, sp = load_members(paths, resolve_device(device), Path(spm_path) if spm_path else None)
        return cls(model, sp, options or SearchOptions())

    def encode(self, sentence: str) -> list[int]:
        return source_tokens(self.sp.encode(sentence), self.model.cfg.max_positions)

    def search(self, sources: Sequence[Sequence[int]]) -> list[list[int]]:
        """Best hypothesis (token ids, no bos/eos) for each source, same order, as one batch."""
        if self.engine_search is not None:
            return self.engine_search(sources, self.options)
        return search_batch(self.model, sources, self.options)

    def translate(self, sentences: Sequence[str], progress: Callable[[int], object] | None = None) -> list[str]:
        """Translations in input order; `progress(n)` is called after each batch of n sentences."""
        sources = [self.encode(s) for s in sentences]
        found = translate_in_batches(self.search, sources, self.options.max_tokens, progress)
        return [self.sp.decode(ids) for ids in found]
