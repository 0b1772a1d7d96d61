"""Convert a standalone model file to a CTranslate2 model folder, for the CTranslate2 decode engine
(pipeline/common/ct2_engine.py).

    python -m pipeline.common.ct2_convert models/average.pt --out models/ct2 [--quantization int8]

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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import ctranslate2
import numpy as np
import torch
from ctranslate2.specs import common_spec, transformer_spec

from pipeline.common.files import atomic_path
from transformer.checkpoint import load_model
from transformer.model import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Transformer, sinusoid_table

META_FILE = "transformer.json"  # our side of the conversion: ids, max_positions, provenance
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")
SPECIALS = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}


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
