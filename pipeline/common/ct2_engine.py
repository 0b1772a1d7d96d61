"""A CTranslate2 decode engine for our own models: beam search in a model converted by
pipeline/common/ct2_convert.py, with our search's semantics.

Search (`CT2Translator.search`) returns `transformer.beam_search.Hypothesis` lists, as `beam_search` does. How it maps
onto ours (transformer/beam_search.py), precisely:
- Length penalty. CTranslate2 scores a finished hypothesis logP / |Y|^α where |Y| = its generated tokens *with*
  the eos (its DecodingOptions.include_eos_in_hypotheses is always true for translation; return_end_token only
  strips the eos afterwards): that is our "hf" penalty exactly. GNMT's ((5 + |Y|)/6)^α it has not, so we pass
  it an α' ≠ 0 (every α' ≠ 0 gives the same search: `ct2_length_penalty`), ask for every finished hypothesis
  (num_hypotheses = beam·patience) with scores, recover logP = score·|Y|^α' and rank by GNMT. α = 0: α' = 0,
  raw log-probs directly.
- Stopping. With α ≠ 0 CTranslate2 stops a sentence once beam·patience hypotheses have finished: with patience 1
  that is our stop="k_finished" (fairseq's rule), not our default "bound". The live beams evolve the same way
  under any stop rule, so a larger `patience` only searches longer and collects a superset of finished
  hypotheses: once it runs at least as long as "bound" would, the 1-best equals ours under "bound" (no
  certificate is available: the live scores are not returned). With α = 0 CTranslate2 stops when the best
  candidate of a step is an eos and num_hypotheses have finished: for the 1-best that is our "bound" with α = 0.
- Candidates: both take the 2·beam best extensions, end the hypotheses whose eos is among the beam best, and keep
  the beam best non-eos ones live; the first step expands one row. Same tie rules are not guaranteed (equal
  scores may come out in another order).
- When more than beam·patience hypotheses finish on the stopping step (at most 2·beam − 1 can), CTranslate2
  keeps the beam·patience best by logP/|Y|^α' before we re-rank by GNMT; ours keeps the best by GNMT. For "hf"
  α' = α, the same; for "gnmt" α' has GNMT's slope at the source length, so a GNMT-best can be lost there only
  when the lengths of the finished hypotheses are far apart.
- pad and bos are never generated: CTranslate2 suppresses them (`suppress_sequences`) *before* its softmax, so
  its log-probs are normalised over the other tokens, ours over all of them: each step's log-prob is higher by
  −log(1 − P(pad) − P(bos)), negligible for a trained model (it never sees them as targets), and the ranking
  of candidates from different beams can move by that much. `rescore=True` re-scores the finished hypotheses
  with `score_batch` (one teacher-forced pass, normalised over all tokens) before ranking: our log-probs.
- Maximum length: ours is per sentence (⌊a·|x|⌋ + b, capped at max_positions − 1), CTranslate2's
  `max_decoding_length` per call (the limit + 1: the tokens plus the eos). On its last step CTranslate2 ends the
  beam-best candidates whatever they are, where ours allows only the eos: a hypothesis that comes out without eos
  is cut to `limit` tokens and re-scored with the eos (`score_batch`, normalised over all tokens like ours). The
  set that reaches the limit can still differ from ours (ours ends every live beam there with its eos).
  A batch is decoded in one call with its longest limit, then by limit again only the sentences whose search
  ran into a shorter limit of their own. That is exact: the limit changes nothing before the last step, and a
  sentence whose search stopped earlier (its longest returned hypothesis is shorter than its limit; CTranslate2
  returns the beam·patience best finished ones and stops when that many have finished, so one of them finished
  on the stopping step) would have stopped there under its own limit too. With α = 0 CTranslate2 exits early
  and its results do not show where, so such searches go by limit from the start, as do all searches while
  most sentences reach their limit (a model that seldom chooses eos), which would only waste the long call.
- Batches: CTranslate2 sorts a call's sentences by length, cuts them into batches of `max_batch_size` and
  decodes `inter_threads` batches at once. A sentence's search does not depend on the others in its batch, so
  this changes no result beyond float rounding (which may break a near-tie another way), only the time: on a
  CPU, small batches on one thread each beat one batch on every thread (bench/README.md).
- A source that is only eos (an empty line): CTranslate2 does not run the model and returns the empty
  hypothesis with log-prob 0; ours decodes it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import ctranslate2

from pipeline.common.ct2_convert import META_FILE
from transformer.beam_search import LENGTH_PENALTIES, Hypothesis
from transformer.model import BOS_ID, EOS_ID, PAD_ID
from transformer.search import max_output_length

COMPUTE_TYPES = (
    "default",  # the type the weights were saved in (convert's quantization)
    "auto",  # CTranslate2's fastest supported type on the device
    "float32",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
)


def resolve_device(device: str) -> tuple[str, int]:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when CTranslate2 sees a GPU) as CTranslate2's (device, index)."""
    if device == "auto":
        return ("cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"), 0
    name, _, index = device.partition(":")
    if name not in ("cpu", "cuda") or (index and not index.isdigit()) or (name == "cpu" and index):
        raise ValueError(f"decode.device '{device}': use auto, cpu, cuda or cuda:N")
    if name == "cuda" and ctranslate2.get_cuda_device_count() <= int(index or 0):
        raise ValueError(
            f"decode.device '{device}': CTranslate2 {ctranslate2.__version__} sees "
            f"{ctranslate2.get_cuda_device_count()} CUDA device(s); use decode.device: auto or cpu"
        )
    return name, int(index or 0)


def check_compute_type(compute_type: str, device: str, device_index: int = 0) -> None:
    """A ValueError naming `decode.compute_type` and what the device supports, before any model is loaded
    (CTranslate2 itself would fall back to another type with only a log line)."""
    supported = sorted(ctranslate2.get_supported_compute_types(device, device_index))
    if compute_type in ("default", "auto") or compute_type in supported:
        return
    known = "" if compute_type in COMPUTE_TYPES else f" (CTranslate2 knows {', '.join(COMPUTE_TYPES)})"
    raise ValueError(
        f"decode.compute_type '{compute_type}' is not supported by CTranslate2 {ctranslate2.__version__} on "
        f"{device}; supported there: {', '.join(supported)}, or auto / default{known}"
    )


def length_penalty_value(kind: str, alpha: float, length: int) -> float:
    """lp(|Y|), |Y| counting the eos, as transformer.beam_search.penalty_table computes it."""
    if kind == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    return max(length, 1) ** alpha


def ct2_length_penalty(kind: str, alpha: float, beam: int, expected_length: float) -> float:
    """The α passed to CTranslate2, which ranks by logP / |Y|^α; any α ≠ 0 gives the same search (same stop
    rule) and lets `search` recover logP = score·|Y|^α, so it only decides which finished hypotheses survive when
    more than beam·patience finish on the stopping step. "hf": α itself (our ranking exactly). "gnmt": the α'
    whose |Y|^α' has GNMT's slope in log |Y| at the expected length L (the source's, eos included),
    d log((5 + L)/6)^α / d log L = α·L/(5 + L). 0 for greedy search (one hypothesis, the raw log-prob) and for
    α = 0 (CTranslate2 then switches to its early exit, module docstring)."""
    if beam == 1 or alpha == 0:
        return 0.0
    if kind == "hf":
        return alpha
    return alpha * expected_length / (5.0 + expected_length)


ROWS_PER_BATCH = 256  # beams a CPU batch holds: the fastest of those measured at both sizes (bench/README.md)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_batches(device: str, threads: int) -> int:
    """CTranslate2's inter_threads by default: on a CPU one batch per thread, up to 4 (each batch then on
    threads // 4): small batches on one thread each keep more of the cores busy than one batch on all of them
    (bench/README.md, measured on 2 cores); on a GPU one batch, as large as it comes."""
    return min(threads, 4) if device == "cpu" else 1


def batch_sentences(inter_threads: int, beam: int) -> int:
    """CTranslate2's max_batch_size (sentences) by default: with several batches at once, as many sentences as
    make ROWS_PER_BATCH beams, so that a call splits into batches for every thread; else 0 (the call as is)."""
    return math.ceil(ROWS_PER_BATCH / beam) if inter_threads > 1 else 0


class CT2Translator:
    """A converted model (`convert`) loaded into CTranslate2, searching our id sequences."""

    def __init__(
        self, model_dir: str | Path, device: str = "cpu", compute_type: str = "default", threads: int = 0,
        inter_threads: int = 0, max_batch_size: int = 0,
    ):  # fmt: skip
        """`device`: cpu, cuda, cuda:N or auto; `compute_type` as CTranslate2 names it (see COMPUTE_TYPES);
        `threads`: CPU threads in all (0: the cores this process may use); `inter_threads`: batches CTranslate2
        decodes at once, each on threads // inter_threads threads (0: `parallel_batches`); `max_batch_size`:
        the sentences of one such batch, a call's sentences sorted by length and cut into batches of that many
        (0: `batch_sentences` for the search's beam). Neither changes a result (module docstring)."""
        if min(threads, inter_threads, max_batch_size) < 0:
            raise ValueError(
                f"threads ({threads}), inter_threads ({inter_threads}) and max_batch_size ({max_batch_size}) "
                "must be >= 0 (0: auto)"
            )
        self.model_dir = model_dir = Path(model_dir)
        meta_path = model_dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{model_dir}: not a model converted by this project's ct2_engine (no {META_FILE})")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.device, self.device_index = resolve_device(device)
        check_compute_type(compute_type, self.device, self.device_index)
        self.max_positions = int(self.meta["max_positions"])
        self.tokens: list[str] = json.loads((model_dir / "shared_vocabulary.json").read_text(encoding="utf-8"))
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        threads = threads or usable_cores()
        self.inter_threads = inter_threads or parallel_batches(self.device, threads)
        self.max_batch_size = max_batch_size
        self.translator = ctranslate2.Translator(
            str(model_dir),
            device=self.device,
            device_index=self.device_index,
            compute_type=compute_type,
            inter_threads=self.inter_threads,
            intra_threads=max(1, threads // self.inter_threads),
        )
        self.compute_type = self.translator.compute_type
        self.ended_early_share = 1.0  # of the last call's sentences, those that stopped before their limit

    def _source_tokens(self, src: Sequence[int]) -> list[str]:
        if not 0 < len(src) <= self.max_positions:
            raise ValueError(f"source of {len(src)} tokens: must have 1..max_positions ({self.max_positions})")
        try:
            return [self.tokens[i] for i in src]
        except IndexError:
            raise ValueError(f"source id out of the vocabulary (0..{len(self.tokens) - 1}): {list(src)}") from None

    def max_output_length(self, src_len: int, max_len_a: float, max_len_b: int) -> int:
        """transformer.search.max_output_lengths for one source of `src_len` tokens (no padding)."""
        return max_output_length(src_len, max_len_a, max_len_b, self.max_positions)

    def suppressed(self) -> list[list[str]]:
        """pad and bos, never generated (as `suppress_sequences`)."""
        return [[self.tokens[PAD_ID]], [self.tokens[BOS_ID]]]

    def search(
        self,
        sources: Sequence[Sequence[int]],
        beam: int = 4,
        alpha: float = 0.6,
        max_len_a: float = 1.0,
        max_len_b: int = 50,
        nbest: int = 1,
        length_penalty: str = "gnmt",
        patience: float = 1.0,
        rescore: bool = False,
        one_call: bool | None = None,
    ) -> list[list[Hypothesis]]:
        """For each source (our ids, ending with eos, no padding) its `nbest` best hypotheses, best first:
        tokens without bos/eos, score = logprob / lp(|tokens| + 1), logprob including the eos.

        `patience`: CTranslate2's (search until beam·patience hypotheses have finished; 1 = our
        stop="k_finished"). `rescore`: re-score every finished hypothesis with `score_batch` (one teacher-forced
        pass) so that log-probs are normalised over the whole vocabulary, pad and bos included, as ours are,
        before ranking; otherwise they are CTranslate2's, normalised without pad and bos (module docstring).
        `one_call`: decode sources of different length limits in one call, then again by limit only those that
        reached a shorter limit of their own (True), only by limit (False), or the first while it pays (None).
        The results are the same; only the time differs (module docstring)."""
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        if patience <= 0:
            raise ValueError(f"patience must be > 0, got {patience}")
        width = max(1, round(beam * patience)) if beam > 1 else 1  # finished hypotheses CTranslate2 can return
        if not 1 <= nbest <= min(beam, width):
            raise ValueError(f"nbest must be between 1 and beam ({beam}), got {nbest}")
        if length_penalty not in LENGTH_PENALTIES:
            raise ValueError(f"unknown length_penalty '{length_penalty}'; choose one of {LENGTH_PENALTIES}")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        source_tokens = [self._source_tokens(s) for s in sources]
        limits = [self.max_output_length(len(s), max_len_a, max_len_b) for s in sources]
        # One α' for every call of this search: the sentences decoded together then do not change a result.
        ct2_alpha = ct2_length_penalty(length_penalty, alpha, beam, sum(map(len, sources)) / max(len(sources), 1))
        options = dict(beam=beam, patience=patience, width=width, ct2_alpha=ct2_alpha, rescore=rescore)
        found: list[dict | None] = [None] * len(sources)
        todo = list(range(len(sources)))
        if len(set(limits)) > 1 and self._one_call(beam, alpha, patience, one_call):
            longest = max(limits)
            results = self._translate(source_tokens, longest, **options)
            ended = [longest == limit or self._ended_early(f, limit) for f, limit in zip(results, limits, strict=True)]
            self.ended_early_share = sum(ended) / len(ended)
            kept = [i for i in todo if ended[i]]  # only those are re-scored: the others are decoded again
            self._rescore([source_tokens[i] for i in kept], [results[i] for i in kept])
            for i in kept:
                found[i] = results[i]
            todo = [i for i in todo if not ended[i]]
        groups: dict[int, list[int]] = {}
        for i in todo:
            groups.setdefault(limits[i], []).append(i)
        early = 0
        for limit, idx in sorted(groups.items()):
            batch = [source_tokens[i] for i in idx]
            results = self._translate(batch, limit, **options)
            self._rescore(batch, results)
            for i, f in zip(idx, results, strict=True):
                found[i] = f
                early += self._ended_early(f, limit)
        if todo and len(todo) == len(sources):
            self.ended_early_share = early / len(todo)
        out: list[list[Hypothesis]] = []
        for f in found:
            hyps = [
                Hypothesis(list(t), lp / length_penalty_value(length_penalty, alpha, len(t) + 1), lp)
                for t, lp in f.items()
            ]
            hyps.sort(key=lambda h: h.score, reverse=True)
            out.append(hyps[:nbest])
        return out

    def _one_call(self, beam: int, alpha: float, patience: float, one_call: bool | None) -> bool:
        """Whether to decode sources of different length limits in one call (module docstring): only where
        CTranslate2's stopping step can be read off its results (greedy, or beam search without its early exit,
        α ≠ 0, and beam·patience whole, so that CTranslate2 returns as many hypotheses as stop it), and, unless
        `one_call` says, while most sentences of the last call ended before their limit."""
        possible = beam == 1 or (alpha != 0 and float(beam * patience).is_integer())
        if one_call is not None:
            if one_call and not possible:
                raise ValueError(
                    "one_call=True needs beam 1, or alpha != 0 and a whole beam * patience (else CTranslate2's "
                    "results do not show the step it stopped on)"
                )
            return one_call
        return possible and self.ended_early_share >= 0.5

    @staticmethod
    def _ended_early(found: dict[tuple[int, ...], float | None], limit: int) -> bool:
        """Whether a sentence's search stopped before its last step (`limit` tokens + eos): then a longer limit
        gives the same result. CTranslate2 returns the `width` best of its finished hypotheses and stops on the
        step where the width-th finishes, so at least one returned hypothesis finished on that step: the longest
        returned one ends on it. Hypotheses cut at the limit have `limit` tokens."""
        return all(len(tokens) < limit for tokens in found)

    def _translate(
        self, batch: list[list[str]], limit: int, beam: int, patience: float, width: int, ct2_alpha: float,
        rescore: bool,
    ) -> list[dict[tuple[int, ...], float | None]]:  # fmt: skip
        """One CTranslate2 call with `limit` output tokens for every source of `batch`: each sentence's finished
        hypotheses as {our token ids (no eos): log-prob}, None for those `_rescore` must score (`_finished`)."""
        results = self.translator.translate_batch(
            batch,
            beam_size=beam,
            patience=patience if beam > 1 else 1.0,
            num_hypotheses=width,
            length_penalty=ct2_alpha,
            return_scores=True,
            return_end_token=True,
            max_decoding_length=limit + 1,  # the tokens plus the eos
            min_decoding_length=0,  # the empty hypothesis (eos first) is allowed, as in ours
            max_input_length=0,  # sources were checked against max_positions above
            suppress_sequences=self.suppressed(),
            max_batch_size=self.max_batch_size or batch_sentences(self.inter_threads, beam),
            batch_type="examples",
        )
        return [self._finished(r, limit, ct2_alpha, rescore) for r in results]

    def _rescore(self, batch: list[list[str]], found: list[dict[tuple[int, ...], float | None]]) -> None:
        """Fill in the log-probs left None in `found` (one dict per source of `batch`) by one `score_batch`
        call: our log-prob of the tokens plus the eos, normalised over the whole vocabulary."""
        todo = [(j, tokens) for j, f in enumerate(found) for tokens, logprob in f.items() if logprob is None]
        if todo:
            scored = self.translator.score_batch(
                [batch[j] for j, _ in todo], [[self.tokens[t] for t in tokens] for _, tokens in todo],
                max_input_length=0,
            )  # fmt: skip
            for (j, tokens), s in zip(todo, scored, strict=True):
                found[j][tokens] = float(sum(s.log_probs))

    def _finished(self, result, limit: int, ct2_alpha: float, rescore: bool) -> dict[tuple[int, ...], float | None]:
        """One sentence's finished hypotheses as {our token ids (no eos): log-prob}, None where it must be scored:
        every one if `rescore`, else those that CTranslate2 ended at the maximum length without an eos (cut to
        `limit` tokens, to end with the eos as ours would)."""
        eos = self.tokens[EOS_ID]
        found: dict[tuple[int, ...], float | None] = {}
        cut: list[tuple[int, ...]] = []
        for hyp, score in zip(result.hypotheses, result.scores, strict=True):
            if not hyp:  # an empty source: CTranslate2 skipped it (empty hypothesis, score 0)
                found.setdefault((), 0.0)
            elif hyp[-1] == eos:
                logprob = None if rescore else score * len(hyp) ** ct2_alpha  # CTranslate2's |Y| counts the eos
                found.setdefault(tuple(self.ids[t] for t in hyp[:-1]), logprob)
            else:
                cut.append(tuple(self.ids[t] for t in hyp[:limit]))
        for tokens in cut:
            found.setdefault(tokens, None)
        return found
