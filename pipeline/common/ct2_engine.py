"""A CTranslate2 decode engine for our own models: convert a standalone model file, then beam-search with it.

    python -m pipeline.common.ct2_engine models/average.pt --out models/ct2 [--quantization int8]

`convert` builds CTranslate2's model from its spec API (`TransformerSpec.from_config(..., pre_norm=False)`, the
weights set by hand, as its fairseq converter does), not through its Hugging Face Marian loader, which assumes
OPUS-MT conventions that are not ours (STACK-FACTS). Layout, checked against the C++ (CTranslate2 4.8):
- post-norm layers, ReLU, one embedding matrix for encoder, decoder and output projection (aliased on save),
  scaled by √d_model (`scale_embeddings`), no final layer norm, no logit bias, LayerNorm ε = 1e-5 (torch's);
- positions: CTranslate2's built-in sinusoid is [sin | cos] concatenated, with timescales log(10⁴)/(d/2 − 1) and
  positions counted from 1 (tensor2tensor/fairseq), not §3.5's interleaved table from 0. So our own table,
  `sinusoid_table(max_positions, d_model)`, is written as `position_encodings/encodings`; CTranslate2 adds row
  `step` to the token at position `step` (0 first) and refuses positions beyond the table, as we do;
- fused projections keep our order: self-attention Q|K|V (`linear_0`), cross-attention Q (`linear_0`) and K|V
  (`linear_1`);
- vocabulary: our ids in order (sentencepiece pieces, or `<id_N>` placeholders); bos/eos/unk tokens and the
  decoder start token are ours (pieces 2, 3, 1), no source bos/eos added (our sources already end with eos).

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
  `max_decoding_length` per call, so sentences are decoded in groups of equal limit, with
  max_decoding_length = limit + 1 (the tokens plus the eos). On its last step CTranslate2 ends the beam-best
  candidates whatever they are, where ours allows only the eos: a hypothesis that comes out without eos is cut
  to `limit` tokens and re-scored with the eos (`score_batch`, normalised over all tokens like ours). The set
  that reaches the limit can still differ from ours (ours ends every live beam there with its eos).
- A source that is only eos (an empty line): CTranslate2 does not run the model and returns the empty
  hypothesis with log-prob 0; ours decodes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import ctranslate2
import numpy as np
import torch
from ctranslate2.specs import common_spec, transformer_spec

from pipeline.common.files import atomic_path
from transformer.beam_search import LENGTH_PENALTIES, Hypothesis
from transformer.checkpoint import load_model
from transformer.model import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Transformer, sinusoid_table
from transformer.search import max_output_length

META_FILE = "transformer.json"  # our side of the conversion: ids, max_positions, provenance
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
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")
SPECIALS = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}


# --- conversion ---


def placeholder_tokens(vocab_size: int) -> list[str]:
    """Token strings for a model without a sentencepiece model: <pad> <unk> <s> </s> <id_4> ... <id_{V-1}>."""
    return [SPECIALS.get(i, f"<id_{i}>") for i in range(vocab_size)]


def tokens_from_extra(extra: dict, vocab_size: int) -> list[str] | None:
    """The sentencepiece pieces of the BPE model embedded in a model file (`extra["bpe"]["model_proto"]`, written
    by the average stage), in id order; None when there is none."""
    bpe = extra.get("bpe") or {}
    proto = bpe.get("model_proto")
    if proto is None:
        return None
    import sentencepiece as spm  # a project dependency; only needed when the file embeds a model

    data = proto.numpy().tobytes() if isinstance(proto, torch.Tensor) else bytes(proto)
    if bpe.get("sha256") and hashlib.sha256(data).hexdigest() != bpe["sha256"]:
        raise ValueError("embedded sentencepiece model does not match its recorded sha256")
    sp = spm.SentencePieceProcessor(model_proto=data)
    if sp.get_piece_size() != vocab_size:
        raise ValueError(f"embedded sentencepiece model has {sp.get_piece_size()} pieces, the model {vocab_size}")
    return [sp.id_to_piece(i) for i in range(vocab_size)]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy().copy()


def _linear(spec, linear: torch.nn.Linear) -> None:
    spec.weight = _numpy(linear.weight)
    spec.bias = _numpy(linear.bias)


def _norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma = _numpy(norm.weight)
    spec.beta = _numpy(norm.bias)


def model_spec(model: Transformer, tokens: Sequence[str]) -> transformer_spec.TransformerSpec:
    """CTranslate2's TransformerSpec holding our weights (see the module docstring for the layout)."""
    cfg = model.cfg
    if len(tokens) != cfg.vocab_size:
        raise ValueError(f"{len(tokens)} tokens for a vocabulary of {cfg.vocab_size}")
    if len(set(tokens)) != len(tokens):
        raise ValueError("token strings must be distinct: CTranslate2 maps them back to ids")
    for ln in model.modules():
        if isinstance(ln, torch.nn.LayerNorm) and ln.eps != 1e-5:
            raise ValueError(f"LayerNorm eps {ln.eps}: the conversion writes 1e-5")
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.encoder_layers, cfg.decoder_layers),
        cfg.heads,
        pre_norm=False,  # §3.1: LayerNorm(x + Sublayer(x))
        activation=common_spec.Activation.RELU,  # §3.3
    )
    embed = _numpy(model.embed.weight)
    table = _numpy(sinusoid_table(cfg.max_positions, cfg.d_model))  # (P, d): row p for position p, sin/cos interleaved
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = embed
    dec.embeddings.weight = embed
    dec.projection.weight = embed  # tied (§3.4); save() stores it once and aliases the others
    for side in (enc, dec):
        side.scale_embeddings = True  # × √d_model
        side.position_encodings.encodings = table
    for layer_spec, layer in zip(enc.layer, model.encoder, strict=True):
        _linear(layer_spec.self_attention.linear[0], layer.self_attn.in_proj)  # Q|K|V
        _linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj)
        _norm(layer_spec.self_attention.layer_norm, layer.norm1)
        _linear(layer_spec.ffn.linear_0, layer.ffn[0])
        _linear(layer_spec.ffn.linear_1, layer.ffn[2])
        _norm(layer_spec.ffn.layer_norm, layer.norm2)
    for layer_spec, layer in zip(dec.layer, model.decoder, strict=True):
        _linear(layer_spec.self_attention.linear[0], layer.self_attn.in_proj)
        _linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj)
        _norm(layer_spec.self_attention.layer_norm, layer.norm1)
        _linear(layer_spec.attention.linear[0], layer.cross_attn.q_proj)
        _linear(layer_spec.attention.linear[1], layer.cross_attn.kv_proj)  # K|V
        _linear(layer_spec.attention.linear[2], layer.cross_attn.out_proj)
        _norm(layer_spec.attention.layer_norm, layer.norm2)
        _linear(layer_spec.ffn.linear_0, layer.ffn[0])
        _linear(layer_spec.ffn.linear_1, layer.ffn[2])
        _norm(layer_spec.ffn.layer_norm, layer.norm3)
    tokens = list(tokens)
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    config = spec.config
    config.unk_token, config.bos_token, config.eos_token = tokens[UNK_ID], tokens[BOS_ID], tokens[EOS_ID]
    config.decoder_start_token = tokens[BOS_ID]  # the decoder input is bos + target[:-1]
    config.add_source_bos = config.add_source_eos = False
    config.layer_norm_epsilon = 1e-5
    return spec


def convert(
    model_file: Path, out_dir: Path, quantization: str | None = None, tokens: Sequence[str] | None = None
) -> None:
    """Write the CTranslate2 model of a standalone model file (or training checkpoint) to `out_dir`, atomically
    (a temporary sibling folder renamed into place). `quantization`: the weights' stored type (None: float32).
    `tokens`: the vocabulary's strings in id order; default the pieces of the sentencepiece model embedded in
    the file, else `<id_N>` placeholders (ids round-trip either way)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization '{quantization}'; choose one of {QUANTIZATIONS}")
    model, extra = load_model(model_file)
    vocab = model.cfg.vocab_size
    tokens = list(tokens) if tokens is not None else tokens_from_extra(extra, vocab) or placeholder_tokens(vocab)
    spec = model_spec(model, tokens)
    spec.validate()
    spec.optimize(quantization=quantization)
    meta = {
        "max_positions": model.cfg.max_positions,
        "vocab_size": vocab,
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "quantization": quantization or "float32",
        "source": str(model_file),
        "ctranslate2": ctranslate2.__version__,
    }
    with atomic_path(out_dir) as tmp:  # the folder appears only once complete; a failure keeps the old one
        tmp.mkdir()
        spec.save(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# --- search ---


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


class CT2Translator:
    """A converted model (`convert`) loaded into CTranslate2, searching our id sequences."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", compute_type: str = "default", threads: int = 0):
        """`device`: cpu, cuda, cuda:N or auto; `compute_type` as CTranslate2 names it (see COMPUTE_TYPES);
        `threads`: CTranslate2's intra_threads (0: its default)."""
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
        self.translator = ctranslate2.Translator(
            str(model_dir),
            device=self.device,
            device_index=self.device_index,
            compute_type=compute_type,
            intra_threads=threads,
        )
        self.compute_type = self.translator.compute_type

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

    def limit_groups(self, sources: Sequence[Sequence[int]], max_len_a: float, max_len_b: int) -> dict[int, list[int]]:
        """The indices of `sources` by their maximum output length, shortest limit first: CTranslate2 takes one
        `max_decoding_length` per call."""
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(sources):
            groups.setdefault(self.max_output_length(len(s), max_len_a, max_len_b), []).append(i)
        return dict(sorted(groups.items()))

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
    ) -> list[list[Hypothesis]]:
        """For each source (our ids, ending with eos, no padding) its `nbest` best hypotheses, best first:
        tokens without bos/eos, score = logprob / lp(|tokens| + 1), logprob including the eos.

        `patience`: CTranslate2's (search until beam·patience hypotheses have finished; 1 = our
        stop="k_finished"). `rescore`: re-score every finished hypothesis with `score_batch` (one teacher-forced
        pass) so that log-probs are normalised over the whole vocabulary, pad and bos included, as ours are,
        before ranking; otherwise they are CTranslate2's, normalised without pad and bos (module docstring)."""
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
        suppress = self.suppressed()
        out: list[list[Hypothesis]] = [[] for _ in sources]
        for limit, idx in self.limit_groups(sources, max_len_a, max_len_b).items():
            batch = [source_tokens[i] for i in idx]
            ct2_alpha = ct2_length_penalty(length_penalty, alpha, beam, sum(map(len, batch)) / len(batch))
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
                suppress_sequences=suppress,
            )
            found = [self._finished(r, limit, ct2_alpha, rescore) for r in results]
            todo = [(j, tokens) for j, f in enumerate(found) for tokens, logprob in f.items() if logprob is None]
            if todo:
                scored = self.translator.score_batch(
                    [batch[j] for j, _ in todo], [[self.tokens[t] for t in tokens] for _, tokens in todo],
                    max_input_length=0,
                )  # fmt: skip
                for (j, tokens), s in zip(todo, scored, strict=True):
                    found[j][tokens] = float(sum(s.log_probs))
            for i, f in zip(idx, found, strict=True):
                hyps = [
                    Hypothesis(list(t), lp / length_penalty_value(length_penalty, alpha, len(t) + 1), lp)
                    for t, lp in f.items()
                ]
                hyps.sort(key=lambda h: h.score, reverse=True)
                out[i] = hyps[:nbest]
        return out

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Convert a model file to a CTranslate2 model folder.")
    ap.add_argument("model", type=Path, help="a model file (models/average.pt) or a training checkpoint")
    ap.add_argument("--out", type=Path, required=True, help="folder for the CTranslate2 model")
    ap.add_argument("--quantization", default=None, choices=QUANTIZATIONS, help="stored weight type (float32)")
    args = ap.parse_args(argv)
    convert(args.model, args.out, args.quantization)
    print(f"wrote {args.out} (CTranslate2 {ctranslate2.__version__})", file=sys.stderr)


if __name__ == "__main__":
    main()
