"""Which engine decodes: this library's beam search (`torch`) or CTranslate2 (`ctranslate2`, OpenNMT's C++
inference engine: int8/int16/float16 on CPU and CUDA). The decode stage and the `translate` command choose here;
both engines get the same batches, the same source cap and the same output length rule
(pipeline/common/ct2_engine.py says exactly where their searches agree and where they cannot).

The CTranslate2 model is a cached step, a pure function of the model file: converted once into
`<folder>/ct2/<stem>-<sha256 prefix>/` beside it and reused while the file's bytes are the same.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipeline.common.ct2_convert import convert
from pipeline.common.ct2_engine import CT2Translator
from pipeline.common.files import file_sha256
from pipeline.common.translator import Translator, resolve_device
from transformer.inference import SearchOptions

ENGINES = ("torch", "ctranslate2")
log = logging.getLogger("pipeline.engines")


def converted_model(model_file: Path, folder: Path | None = None) -> Path:
    """The CTranslate2 model of `model_file` (float32 weights; a compute type quantizes them at load), converted
    now unless a conversion of these exact bytes exists; older conversions of the same file are removed. In
    `folder`, by default `ct2/` beside the model file."""
    model_file = Path(model_file)
    folder = model_file.parent / "ct2" if folder is None else Path(folder)
    target = folder / f"{model_file.stem}-{file_sha256(model_file)[:16]}"
    if not (target / "model.bin").is_file():
        log.info("converting %s to a CTranslate2 model in %s", model_file, target)
        convert(model_file, target)
    for old in folder.glob(f"{model_file.stem}-*"):
        if old != target and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return target


def ct2_search(engine: CT2Translator):
    """CTranslate2's search of one batch, with the torch engine's beam, α, length penalty and length rule."""

    def search(sources: Sequence[Sequence[int]], o: SearchOptions) -> list[list[int]]:
        found = engine.search(sources, beam=o.beam, alpha=o.alpha, max_len_a=o.max_len_a, max_len_b=o.max_len_b)
        return [hyps[0].tokens for hyps in found]

    return search


def make_translator(
    models: Sequence[str | Path],
    options: SearchOptions,
    device: str = "auto",
    engine: str = "torch",
    compute_type: str = "default",
    spm_path: str | Path | None = None,
    ct2_folder: Path | None = None,
    *,
    inter_threads: int = 0,
    max_batch_size: int = 0,
) -> Translator:
    """A Translator of one model file (or an ensemble, torch engine only) on the chosen engine; the CTranslate2
    model converted into `ct2_folder` (converted_model's default: beside the model file) and decoded with
    CTranslate2's `inter_threads` and `max_batch_size` (CT2Translator; 0: auto)."""
    if engine not in ENGINES:
        raise ValueError(f"decode.engine: unknown engine '{engine}'; choose one of {ENGINES}")
    if engine == "torch":
        ct2_only = {"compute_type": (compute_type, "default"), "ct2_inter_threads": (inter_threads, 0),
                    "ct2_max_batch_size": (max_batch_size, 0)}  # fmt: skip
        for key, (value, default) in ct2_only.items():
            if value != default:
                raise ValueError(f"decode.{key} '{value}' is CTranslate2's: it needs decode.engine ctranslate2")
        return Translator.from_file(list(models), options, device=device, spm_path=spm_path)
    if len(models) != 1:
        raise ValueError(f"decode.engine ctranslate2 decodes one model, got {len(models)}: ensembles need engine torch")
    # The torch model stays on the CPU: it gives the vocabulary, the source cap and the sentencepiece model.
    translator = Translator.from_file(models[0], options, device="cpu", spm_path=spm_path)
    where = "cuda" if device == "auto" and resolve_device("auto").type == "cuda" else device
    ct2 = CT2Translator(
        converted_model(Path(models[0]), ct2_folder), device=where, compute_type=compute_type,
        inter_threads=inter_threads, max_batch_size=max_batch_size,
    )  # fmt: skip
    translator.engine_search = ct2_search(ct2)
    translator.device = f"ctranslate2:{ct2.device} ({ct2.compute_type})"
    return translator
