"""The Transformer of Vaswani et al. 2017, "Attention Is All You Need" (§3), for translation.

Post-norm residual blocks LayerNorm(x + Dropout(Sublayer(x))) (§3.1, §5.4), scaled dot-product attention (§3.2)
through `F.scaled_dot_product_attention` so GPUs get fused kernels (on a CPU, short sequences by two matmuls:
`short_attention`), ReLU position-wise feed-forward (§3.3), one embedding matrix shared by source, target and
the pre-softmax projection, scaled by √d_model (§3.4), sinusoidal positional encoding (§3.5).

Search talks to the model through a narrow interface: `encode`, `init_state`, `decode_step`, `reorder_state`.
`transformer.attention_maps.record_attention` reads the attention weights out through another: each attention
module's `recorder`, None (SDPA, no weights formed) unless someone is listening.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.dropout import Dropout

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    encoder_layers: int = 6  # N (§3.1)
    decoder_layers: int = 6
    d_model: int = 512
    d_ff: int = 2048
    heads: int = 8  # h (§3.2.2)
    dropout: float = 0.1  # P_drop (§5.4): sub-layer outputs and embedding sums
    # Not in the paper, opt-in (fairseq's --attention-dropout, --activation-dropout): dropout of the attention
    # weights softmax(QKᵀ/√d_k), and of the FFN's hidden units max(0, xW1 + b1); 0 leaves the paper's model.
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_positions: int = 1024
    pad_id: int = PAD_ID

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        return asdict(self)


# Table 3 of the paper, plus smaller shapes for CPUs, small corpora and tests.
PRESETS: dict[str, dict] = {
    "base": dict(encoder_layers=6, decoder_layers=6, d_model=512, d_ff=2048, heads=8, dropout=0.1),
    "big": dict(encoder_layers=6, decoder_layers=6, d_model=1024, d_ff=4096, heads=16, dropout=0.3),
    # Multi30k on a 2-core CPU (29k pairs): small and strongly regularised; see the README's results.
    "multi30k": dict(encoder_layers=3, decoder_layers=3, d_model=256, d_ff=1024, heads=4, dropout=0.2),
    # "Transformer-tiny" of Wu et al. 2021, the best published text-only Multi30k model.
    "tiny-wu": dict(encoder_layers=4, decoder_layers=4, d_model=128, d_ff=256, heads=4, dropout=0.3),
    # The embedded smoke corpus: the whole DAG in minutes on a CPU.
    "tiny": dict(encoder_layers=2, decoder_layers=2, d_model=64, d_ff=256, heads=4, dropout=0.1),
}


def make_config(arch: str, vocab_size: int, **overrides) -> TransformerConfig:
    """The named preset with `overrides` applied (keys of `TransformerConfig`)."""
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture '{arch}'; choose one of {sorted(PRESETS)}")
    return replace(TransformerConfig(vocab_size=vocab_size, **PRESETS[arch]), **overrides)


def sinusoid_table(max_positions: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...) (§3.5)."""
    position = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    div = torch.pow(10000.0, torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d/2,)
    table = torch.zeros(max_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position / div)
    table[:, 1::2] = torch.cos(position / div)
    return table.float()


class EncoderOut(NamedTuple):
    memory: Tensor  # (B, S, d_model)
    src_mask: Tensor | None  # (B, 1, 1, S) bool, True where attention may look; None: no padding


# Up to this many keys, attention on a CPU forms its weights with two batched matmuls and a softmax: SDPA's fused
# CPU kernel costs more per (sentence, head) than these small products: forward and backward of a layer of 2,048
# tokens at Multi30k's lengths (13-26 tokens) 1.1-1.6x faster, at 43 tokens 1.3x, at 64 even, at 128 SDPA ahead
# by 1.25x (`bench/short_attention.py`, 2-core AMD EPYC; bench/README.md).
SHORT_KEYS = 48


def short_attention(q: Tensor, k: Tensor) -> bool:
    """Whether attention of q (B, h, T, d_k) over k (B, h, S, d_k) forms its weights by matmuls (SHORT_KEYS)
    rather than through SDPA. One query (incremental decoding's self-attention) stays on SDPA: its products are
    vectors, and decoding was slower by matmuls there."""
    return q.device.type == "cpu" and q.shape[-2] > 1 and k.shape[-2] <= SHORT_KEYS


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """softmax(QKᵀ / √d_k) (§3.2.1) as SDPA forms it inside: `mask` (B, 1, 1, S) True where attention may look,
    `causal` hides later keys (row i sees keys 0..i). q (B, h, T, d_k), k (B, h, S, d_k) -> (B, h, T, S)."""
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, h, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    return scores.softmax(dim=-1)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O (§3.2.2); projections fused where inputs coincide."""

    def __init__(self, d_model: int, heads: int, self_attention: bool, dropout: float = 0.0):
        super().__init__()
        self.heads, self.d_k = heads, d_model // heads
        self.dropout = dropout  # of the attention weights, while training
        self.self_attention = self_attention
        if self_attention:
            self.in_proj = nn.Linear(d_model, 3 * d_model)  # W^Q, W^K, W^V in one matmul
        else:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)  # over the encoder output, computed once
        self.out_proj = nn.Linear(d_model, d_model)
        # A list while `record_attention` listens: each call appends its weights (B, h, T_q, T_k). None otherwise,
        # so training pays one attribute test per call and keeps SDPA's fused kernels (which never form them)
        # wherever they are the faster path.
        self.recorder: list[Tensor] | None = None

    def split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.d_k).transpose(1, 2)  # (B, h, T, d_k)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)  # (B, h, S, d_k) each

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        p = self.dropout if self.training else 0.0
        if self.recorder is None and not short_attention(q, k):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        else:
            weights = attention_weights(q, k, mask, causal)  # (B, h, T, S)
            if self.recorder is not None:
                self.recorder.append(weights.detach())
            out = F.dropout(weights, p).to(v.dtype) @ v
        B, _, T, _ = out.shape  # out (B, h, T, d_k)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.d_k))  # (B, T, d_model)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """Self-attention over the whole sequence x (B, T, d_model)."""
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        return self.attend(self.split_heads(q), self.split_heads(k), self.split_heads(v), mask, causal)


class FeedForward(nn.Sequential):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (§3.3), with `dropout` of the hidden units while training."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        # The activation (and its dropout) stays element 1, so parameter names are ffn.0.* and ffn.2.* either way.
        activation = nn.Sequential(nn.ReLU(), Dropout(dropout)) if dropout else nn.ReLU()
        super().__init__(nn.Linear(d_model, d_ff), activation, nn.Linear(d_ff, d_model))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.heads, True, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: Tensor, src_mask: Tensor | None) -> Tensor:
        x = self.norm1(self.dropout.residual(x, self.self_attn(x, src_mask)))
        return self.norm2(self.dropout.residual(x, self.ffn(x)))  # (B, S, d_model)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.heads, True, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.heads, False, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.dropout = Dropout(cfg.dropout)

    def forward(self, y: Tensor, memory_kv: tuple[Tensor, Tensor], src_mask: Tensor | None) -> Tensor:
        # Causal masking alone suffices: target padding sits after every real token, so no real query
        # ever sees it, and padded positions are excluded from the loss.
        y = self.norm1(self.dropout.residual(y, self.self_attn(y, causal=True)))
        return self._cross_and_ffn(y, memory_kv, src_mask)  # (B, T, d_model)

    def _cross_and_ffn(self, y: Tensor, memory_kv: tuple[Tensor, Tensor], src_mask: Tensor | None) -> Tensor:
        q = self.cross_attn.split_heads(self.cross_attn.q_proj(y))
        y = self.norm2(self.dropout.residual(y, self.cross_attn.attend(q, *memory_kv, src_mask, causal=False)))
        return self.norm3(self.dropout.residual(y, self.ffn(y)))

    def step(self, y: Tensor, cache: LayerCache, t: int, src_mask: Tensor | None, beam: int) -> Tensor:
        """Position t of R = N·beam rows y (R, 1, d_model), attending to the cached keys/values 0..t."""
        attn, R = self.self_attn, y.shape[0]
        q, kv = attn.in_proj(y).split([attn.heads * attn.d_k, 2 * attn.heads * attn.d_k], dim=-1)
        cache.self_kv[:, :R, t] = kv.view(R, 2, attn.heads, attn.d_k).transpose(0, 1)
        k_all, v_all = cache.self_kv[:, :R, : t + 1].transpose(2, 3)  # (R, h, t+1, d_k) each
        y = self.norm1(self.dropout.residual(y, attn.attend(attn.split_heads(q), k_all, v_all, None, causal=False)))
        # A sentence's beams are `beam` queries against its one copy of the encoder output: cross-attention and
        # the FFN treat positions independently, so this equals R separate rows without repeating the memory.
        y = self._cross_and_ffn(y.view(R // beam, beam, -1), (cache.memory_k, cache.memory_v), src_mask)
        return y.view(R, 1, -1)


@dataclass
class LayerCache:
    memory_k: Tensor  # (N, h, S, d_k): encoder keys, once per sentence, computed once (§6.1 decoding cost)
    memory_v: Tensor
    self_kv: Tensor  # (2, R_max, T_max, h, d_k): decoder keys and values, filled one position per step
    spare_kv: Tensor  # what the next reorder copies into, so that steps do not allocate


@dataclass
class DecoderState:
    """Decoder caches for R = N·beam rows: row r belongs to sentence r // beam. The state is updated in place
    by `decode_step`, and `reorder_state` reuses its buffers: keep only the state it returns."""

    layers: list[LayerCache]
    src_mask: Tensor | None  # (N, 1, 1, S)
    t: int = 0  # next position to fill
    beam: int = 1  # rows per sentence


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.register_buffer("pe", sinusoid_table(cfg.max_positions, cfg.d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.dropout = Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier for projections; N(0, d^-1/2) for the shared embedding so that √d scaling gives unit variance.
        for name, p in self.named_parameters():
            if name == "embed.weight":
                nn.init.normal_(p, mean=0.0, std=self.cfg.d_model**-0.5)
                with torch.no_grad():
                    p[self.cfg.pad_id].zero_()
            elif p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def embed_tokens(self, tokens: Tensor, start: int = 0) -> Tensor:
        T = tokens.shape[1]
        if start + T > self.cfg.max_positions:
            raise ValueError(f"sequence of {start + T} positions exceeds max_positions {self.cfg.max_positions}")
        x = self.embed(tokens) * math.sqrt(self.cfg.d_model) + self.pe[start : start + T]
        return self.dropout(x)  # (B, T, d_model)

    def encode(self, src: Tensor) -> EncoderOut:
        """src (B, S) token ids, padded with pad_id."""
        pad = src.eq(self.cfg.pad_id)
        src_mask = (~pad)[:, None, None, :] if bool(pad.any()) else None  # (B, 1, 1, S)
        x = self.embed_tokens(src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return EncoderOut(x, src_mask)

    def decode(self, tgt_in: Tensor, enc: EncoderOut, keep: Tensor | None = None, project: bool = True) -> Tensor:
        """Teacher-forced decoding of tgt_in (B, T) = bos + target[:-1]; logits (B, T, V), or (N, V) for only
        the N positions where `keep` (B, T) is True: training passes target != pad and skips the projection,
        the largest matmul of a step, at padded positions. project=False: the last hidden states instead
        (B, T, d_model) or (N, d_model), for a loss that projects them itself (`projected_label_smoothed_nll_loss`)."""
        y = self.embed_tokens(tgt_in)
        for layer in self.decoder:
            y = layer(y, layer.cross_attn.project_kv(enc.memory), enc.src_mask)
        y = y if keep is None else y[keep]  # (B, T, d_model) or (N, d_model)
        return self.project(y) if project else y

    def project(self, y: Tensor) -> Tensor:
        return F.linear(y, self.embed.weight)  # (B, T, V): pre-softmax weights shared (§3.4)

    def forward(self, src: Tensor, tgt_in: Tensor, keep: Tensor | None = None, project: bool = True) -> Tensor:
        """Logits (B, T, V), or (N, V) at the positions where `keep` (B, T) is True; project=False: the hidden
        states that the logits would be computed from (see `decode`)."""
        return self.decode(tgt_in, self.encode(src), keep, project)

    # --- incremental decoding: the narrow interface that search uses ---

    def init_state(self, enc: EncoderOut, max_len: int) -> DecoderState:
        """A state of one row per sentence for up to `max_len` decoder positions (bos included)."""
        if max_len > self.cfg.max_positions:
            raise ValueError(f"max_len {max_len} exceeds max_positions {self.cfg.max_positions}")
        N, h = enc.memory.shape[0], self.cfg.heads
        layers = []
        for layer in self.decoder:
            k, v = layer.cross_attn.project_kv(enc.memory)  # (N, h, S, d_k) each
            self_kv = k.new_empty(2, N, max_len, h, self.cfg.d_model // h)
            layers.append(LayerCache(k, v, self_kv, torch.empty_like(self_kv)))
        return DecoderState(layers, enc.src_mask)

    def decode_step(self, tokens: Tensor, state: DecoderState, log_probs: bool = True) -> Tensor:
        """tokens (R,) at position state.t; returns log-probabilities (R, V) in float32 and advances the state.
        log_probs=False: the logits instead, for a search that normalises only what it keeps."""
        t = state.t
        if t >= state.layers[0].self_kv.shape[2]:
            raise ValueError(f"decode_step at position {t}: the state holds {state.layers[0].self_kv.shape[2]}")
        y = self.embed_tokens(tokens[:, None], start=t)  # (R, 1, d_model)
        for layer, cache in zip(self.decoder, state.layers, strict=True):
            y = layer.step(y, cache, t, state.src_mask, state.beam)
        state.t = t + 1
        logits = self.project(y[:, 0]).float()  # (R, V)
        return F.log_softmax(logits, dim=-1) if log_probs else logits

    @staticmethod
    def reorder_state(
        state: DecoderState, order: Tensor, beam: int | None = None, within_sentences: bool = False
    ) -> DecoderState:
        """Keep rows `order` (R',) in groups of `beam` per sentence (default: unchanged): surviving beams,
        a beam widened from one row, or finished sentences dropped. Each group must come from one sentence,
        whose encoder side follows the group's first row; `within_sentences=True` promises that rows only
        moved among their own sentence's beams, so the encoder side is left as it is. Only the filled
        positions of the self-attention cache are copied, into the spare buffer, so no step allocates."""
        beam = state.beam if beam is None else beam
        R, t = order.shape[0], state.t
        if R % beam:
            raise ValueError(f"{R} rows do not form groups of beam {beam}")
        if within_sentences and beam != state.beam:
            raise ValueError("within_sentences=True cannot change the beam")
        sentences = None if within_sentences else order[::beam] // state.beam  # (N',)
        layers = []
        for c in state.layers:
            memory_k, memory_v = c.memory_k, c.memory_v
            if sentences is not None:
                memory_k, memory_v = memory_k.index_select(0, sentences), memory_v.index_select(0, sentences)
            spare = c.spare_kv
            if spare.shape[1] < R:
                spare = spare.new_empty(2, R, *spare.shape[2:])
            torch.index_select(c.self_kv[:, :, :t], 1, order, out=spare[:, :R, :t])
            layers.append(LayerCache(memory_k, memory_v, spare, c.self_kv))
        mask = state.src_mask
        if mask is not None and sentences is not None:
            mask = mask.index_select(0, sentences)
        return DecoderState(layers, mask, t, beam)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
