"""Export a trained model to Hugging Face `MarianMTModel`: the same function, in a format the ecosystem reads.

    python -m pipeline.commands.export_marian models/average.pt --out models/hf [--spm data/bpe/spm.model]

Marian in `transformers` is the paper's architecture when configured as here: post-norm residual blocks, ReLU
feed-forward, embeddings scaled by √d_model, one embedding matrix shared by encoder, decoder and the pre-softmax
projection, sinusoidal positions, no layer norm after the embedding or after the last layer, no logit bias.

Two layouts differ. Our fused W^Q|W^K|W^V (and W^K|W^V of cross-attention) are split into Marian's q/k/v
projections. And Marian lays the sinusoid table out as [sin ... | cos ...] where §3.5 (and we) interleave
sin/cos; `save_pretrained` does not store the table (`from_pretrained` recomputes Marian's own), so instead of
copying our table in, we permute the hidden axis of every weight. The network is equivariant under a
permutation of d_model (embeddings, LayerNorm and every projection are permuted consistently; the logits,
a dot product with the permuted embedding, are unchanged), so the exported model computes exactly our function
and reloads from disk to the same function.

`transformers` is an optional dependency: it is imported here only, never by `transformer/`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor

from pipeline.common.files import atomic_path
from transformer.checkpoint import load_model
from transformer.model import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Transformer, sinusoid_table


def marian_permutation(d_model: int) -> Tensor:
    """perm such that Marian's hidden unit m is our unit perm[m]: our sin units (even) first, then cos (odd)."""
    if d_model % 2:
        raise ValueError(f"d_model {d_model} must be even for sinusoidal positions")
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])  # (d_model,)


def marian_config(model: Transformer):
    from transformers import MarianConfig

    cfg = model.cfg
    return MarianConfig(
        vocab_size=cfg.vocab_size,
        decoder_vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_positions,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
        activation_function="relu",  # §3.3
        scale_embedding=True,  # §3.4: embeddings multiplied by √d_model
        share_encoder_decoder_embeddings=True,  # §3.4: one matrix for source, target and output
        tie_word_embeddings=True,
        dropout=cfg.dropout,  # §5.4: residual and embedding dropout
        attention_dropout=cfg.attention_dropout,  # opt-in, 0 in the paper's presets; Marian's are the same places
        activation_dropout=cfg.activation_dropout,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        pad_token_id=cfg.pad_id,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        decoder_start_token_id=BOS_ID,  # the decoder input is bos + target[:-1]
        forced_eos_token_id=None,  # search settings are the caller's (our search forces nothing)
    )


def marian_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our weights under Marian's names, the hidden axis permuted by `marian_permutation`."""
    perm = marian_permutation(model.cfg.d_model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}

    def rows(w: Tensor) -> Tensor:  # output side of a projection into d_model, or a LayerNorm vector
        return w[perm].clone()

    def cols(w: Tensor) -> Tensor:  # input side of a projection out of d_model
        return w[:, perm].clone()

    out = {"model.shared.weight": cols(sd["embed.weight"])}  # (V, d_model); tied to both embeddings and lm_head
    out["final_logits_bias"] = torch.zeros(1, model.cfg.vocab_size)
    for side, n in (("encoder", model.cfg.encoder_layers), ("decoder", model.cfg.decoder_layers)):
        for i in range(n):
            src, dst = f"{side}.{i}.", f"model.{side}.layers.{i}."
            norms = ("self_attn_layer_norm", "final_layer_norm")
            if side == "decoder":
                norms = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
            for j, name in enumerate(norms, start=1):
                out[dst + name + ".weight"] = rows(sd[f"{src}norm{j}.weight"])
                out[dst + name + ".bias"] = rows(sd[f"{src}norm{j}.bias"])
            out[dst + "fc1.weight"] = cols(sd[src + "ffn.0.weight"])
            out[dst + "fc1.bias"] = sd[src + "ffn.0.bias"].clone()
            out[dst + "fc2.weight"] = rows(sd[src + "ffn.2.weight"])
            out[dst + "fc2.bias"] = rows(sd[src + "ffn.2.bias"])
            out.update(_attention(sd, src + "self_attn.", dst + "self_attn.", rows, cols, fused="in_proj"))
            if side == "decoder":
                out.update(_attention(sd, src + "cross_attn.", dst + "encoder_attn.", rows, cols, fused="kv_proj"))
    return out


def _attention(sd: dict, src: str, dst: str, rows, cols, fused: str) -> dict[str, Tensor]:
    """Split the fused projection ("in_proj": Q|K|V, "kv_proj": K|V) into Marian's q/k/v/out projections."""
    names = ("q", "k", "v") if fused == "in_proj" else ("k", "v")
    weights = sd[f"{src}{fused}.weight"].chunk(len(names), dim=0)  # each (d_model, d_model)
    biases = sd[f"{src}{fused}.bias"].chunk(len(names), dim=0)
    out = {}
    for name, w, b in zip(names, weights, biases, strict=True):
        out[f"{dst}{name}_proj.weight"], out[f"{dst}{name}_proj.bias"] = cols(w), b.clone()
    if fused == "kv_proj":
        out[f"{dst}q_proj.weight"], out[f"{dst}q_proj.bias"] = cols(sd[src + "q_proj.weight"]), sd[src + "q_proj.bias"]
    # The heads' concatenation is untouched by the permutation; only out_proj's output side moves.
    out[f"{dst}out_proj.weight"] = rows(sd[src + "out_proj.weight"])
    out[f"{dst}out_proj.bias"] = rows(sd[src + "out_proj.bias"])
    return out


def to_marian(model: Transformer):
    """A `transformers.MarianMTModel` (eval mode, float32, SDPA attention) computing the same function."""
    from transformers import MarianMTModel

    config = marian_config(model)
    config._attn_implementation = "sdpa"
    marian = MarianMTModel(config)
    state = marian_state_dict(model)
    missing, unexpected = marian.load_state_dict(state, strict=False)
    derived = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"}
    derived |= {f"model.{side}.embed_positions.weight" for side in ("encoder", "decoder")}
    if unexpected or set(missing) - derived:
        raise RuntimeError(
            f"weight mapping is incomplete: missing {sorted(set(missing) - derived)}, unexpected {sorted(unexpected)}"
        )
    _check_tied_and_positions(marian, model)
    return marian.eval()


def _check_tied_and_positions(marian, model: Transformer) -> None:
    shared = marian.model.shared.weight
    for w in (
        marian.model.encoder.embed_tokens.weight,
        marian.model.decoder.embed_tokens.weight,
        marian.lm_head.weight,
    ):
        if w.data_ptr() != shared.data_ptr():
            raise RuntimeError("MarianMTModel did not tie its embeddings to model.shared")
    ours = sinusoid_table(model.cfg.max_positions, model.cfg.d_model)[:, marian_permutation(model.cfg.d_model)]
    for side in (marian.model.encoder, marian.model.decoder):
        if not torch.allclose(side.embed_positions.weight, ours, atol=1e-5):
            raise RuntimeError("Marian's sinusoid table is not a permutation of ours (transformers changed?)")


def write_tokenizer(spm_model: Path, out_dir: Path) -> None:
    """Files for `MarianTokenizer.from_pretrained(out_dir)`: our one joint sentencepiece model serves as both
    source.spm and target.spm; vocab.json maps each piece to its sentencepiece id (pad 0, unk 1, bos 2, eos 3),
    so MarianTokenizer's ids are ours, with eos appended as binarise does."""
    import sentencepiece as spm

    if not spm_model.is_file():
        raise FileNotFoundError(f"{spm_model}: sentencepiece model not found")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    specials = {PAD_ID: "pad", UNK_ID: "unk", BOS_ID: "bos", EOS_ID: "eos"}
    for i, what in specials.items():
        if getattr(sp, f"{what}_id")() != i:
            raise ValueError(f"{spm_model}: {what} id is {getattr(sp, f'{what}_id')()}, expected {i}")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    for name in ("source.spm", "target.spm"):
        shutil.copyfile(spm_model, out_dir / name)
    config = {
        "tokenizer_class": "MarianTokenizer",
        "unk_token": sp.id_to_piece(UNK_ID),
        "eos_token": sp.id_to_piece(EOS_ID),
        "pad_token": sp.id_to_piece(PAD_ID),
        "model_max_length": 1024,
        "separate_vocabs": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def export(model_file: Path, out_dir: Path, spm_model: Path | None) -> None:
    model, _ = load_model(model_file)
    marian = to_marian(model)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        marian.save_pretrained(tmp)
        if spm_model is not None:
            write_tokenizer(spm_model, tmp)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a model file (models/average.pt) or a training checkpoint")
    ap.add_argument("--out", type=Path, required=True, help="folder for save_pretrained output")
    ap.add_argument("--spm", type=Path, default=None, help="sentencepiece model: also write MarianTokenizer files")
    args = ap.parse_args(argv)
    export(args.model, args.out, args.spm)
    print(f"wrote {args.out} (MarianMTModel{' + MarianTokenizer' if args.spm else ''})", file=sys.stderr)


if __name__ == "__main__":
    main()
