"""The model is the paper's Transformer: invariants (causality, padding, cached decoding), agreement with an
independent implementation (torch.nn.Transformer), the paper's parameter counts, and that it can learn."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer.loss import label_smoothed_nll_loss
from transformer.model import BOS_ID, EOS_ID, PAD_ID, Transformer, TransformerConfig, make_config

V = 40


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(make_config("tiny", V, max_positions=64)).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a mis-wired vector cannot hide
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _padded_batch(lengths: list[int], T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, V, (len(lengths), T), generator=g)
    for i, n in enumerate(lengths):
        x[i, n:] = PAD_ID
    return x


SRC_LENGTHS, TGT_LENGTHS = [9, 5, 7], [8, 8, 3]


def test_cached_decoding_gives_full_sequence_log_probs(model):
    src = _padded_batch(SRC_LENGTHS, 9, seed=1)
    tgt_in = _padded_batch(TGT_LENGTHS, 8, seed=2)
    tgt_in[:, 0] = BOS_ID
    with torch.no_grad():
        full = F.log_softmax(model(src, tgt_in), dim=-1)  # (B, T, V)
        enc = model.encode(src)
        state = model.init_state(enc, max_len=8)
        steps = torch.stack([model.decode_step(tgt_in[:, t], state) for t in range(8)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


def test_future_target_tokens_do_not_change_earlier_logits(model):
    src = _padded_batch(SRC_LENGTHS, 9, seed=3)
    tgt_in = _padded_batch([8, 8, 8], 8, seed=4)
    k = 4
    changed = tgt_in.clone()
    changed[:, k] = (changed[:, k] + 1 - 4) % (V - 4) + 4  # another real token
    with torch.no_grad():
        a, b = model(src, tgt_in), model(src, changed)
    torch.testing.assert_close(a[:, :k], b[:, :k], atol=0, rtol=0)
    assert (a[:, k:] - b[:, k:]).abs().amax(dim=-1).gt(1e-3).all()  # and it does change position k onwards


def test_padded_batch_gives_each_sentence_its_outputs_alone(model):
    src = _padded_batch(SRC_LENGTHS, 9, seed=5)
    tgt_in = _padded_batch(TGT_LENGTHS, 8, seed=6)
    with torch.no_grad():
        enc = model.encode(src)
        logits = model.decode(tgt_in, enc)
        for i, (s, t) in enumerate(zip(SRC_LENGTHS, TGT_LENGTHS, strict=True)):
            alone_enc = model.encode(src[i : i + 1, :s])
            assert alone_enc.src_mask is None  # no padding: the unmasked path
            torch.testing.assert_close(enc.memory[i, :s], alone_enc.memory[0], atol=1e-5, rtol=0)
            alone = model.decode(tgt_in[i : i + 1, :t], alone_enc)
            torch.testing.assert_close(logits[i, :t], alone[0], atol=1e-5, rtol=0)


def _torch_transformer(model: Transformer) -> nn.Transformer:
    """torch.nn.Transformer (post-norm, ReLU) holding our weights; no final LayerNorms (the paper has none)."""
    cfg = model.cfg
    ref = nn.Transformer(
        d_model=cfg.d_model, nhead=cfg.heads, num_encoder_layers=cfg.encoder_layers,
        num_decoder_layers=cfg.decoder_layers, dim_feedforward=cfg.d_ff, dropout=0.0,
        activation="relu", batch_first=True, norm_first=False,
    )  # fmt: skip
    ref.encoder.norm = ref.decoder.norm = None
    ref.encoder.enable_nested_tensor = ref.encoder.use_nested_tensor = False  # plain dense tensors
    with torch.no_grad():
        for ours, theirs in zip(model.encoder, ref.encoder.layers, strict=True):
            _copy_common(ours, theirs)
        for ours, theirs in zip(model.decoder, ref.decoder.layers, strict=True):
            _copy_common(ours, theirs)
            mha = theirs.multihead_attn
            mha.in_proj_weight.copy_(torch.cat([ours.cross_attn.q_proj.weight, ours.cross_attn.kv_proj.weight]))
            mha.in_proj_bias.copy_(torch.cat([ours.cross_attn.q_proj.bias, ours.cross_attn.kv_proj.bias]))
            mha.out_proj.load_state_dict(ours.cross_attn.out_proj.state_dict())
            theirs.norm3.load_state_dict(ours.norm3.state_dict())
    return ref.eval()


def _copy_common(ours: nn.Module, theirs: nn.Module) -> None:
    theirs.self_attn.in_proj_weight.copy_(ours.self_attn.in_proj.weight)  # both pack W^Q|W^K|W^V
    theirs.self_attn.in_proj_bias.copy_(ours.self_attn.in_proj.bias)
    theirs.self_attn.out_proj.load_state_dict(ours.self_attn.out_proj.state_dict())
    theirs.linear1.load_state_dict(ours.ffn[0].state_dict())
    theirs.linear2.load_state_dict(ours.ffn[2].state_dict())
    theirs.norm1.load_state_dict(ours.norm1.state_dict())
    theirs.norm2.load_state_dict(ours.norm2.state_dict())


def test_same_logits_as_torch_nn_transformer(model):
    ref = _torch_transformer(model)
    src = _padded_batch(SRC_LENGTHS, 9, seed=7)
    tgt_in = _padded_batch([8, 8, 8], 8, seed=8)
    with torch.no_grad():
        ours = model(src, tgt_in)
        pad = src.eq(PAD_ID)
        causal = nn.Transformer.generate_square_subsequent_mask(8)
        hidden = ref(
            model.embed_tokens(src), model.embed_tokens(tgt_in), tgt_mask=causal, tgt_is_causal=True,
            src_key_padding_mask=pad, memory_key_padding_mask=pad,
        )  # fmt: skip
        theirs = model.project(hidden)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def _paper_count(cfg: TransformerConfig) -> int:
    """Hand count: shared embedding; per layer 4 d²+4 d attention, 2 d·d_ff + d_ff + d FFN, 2 d per LayerNorm."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    attention, ffn, norm = 4 * d * d + 4 * d, 2 * d * f + f + d, 2 * d
    return (
        v * d
        + cfg.encoder_layers * (attention + ffn + 2 * norm)
        + cfg.decoder_layers * (2 * attention + ffn + 3 * norm)
    )


@pytest.mark.parametrize(("arch", "paper", "tolerance"), [("base", 65e6, 0.03), ("big", 213e6, 0.02)])
def test_parameter_count_matches_table_3(arch, paper, tolerance):
    with torch.device("meta"):  # no memory, no init cost
        model = Transformer(make_config(arch, 37000))
    n = model.num_parameters()
    assert n == _paper_count(model.cfg)
    assert abs(n - paper) / paper < tolerance, f"{arch}: {n / 1e6:.1f}M parameters, paper {paper / 1e6:.0f}M"


def _greedy(model: Transformer, src: torch.Tensor, max_len: int) -> list[list[int]]:
    state = model.init_state(model.encode(src), max_len)
    tokens = torch.full((src.shape[0],), BOS_ID)
    out = []
    for _ in range(max_len):
        tokens = model.decode_step(tokens, state).argmax(dim=-1)
        out.append(tokens)
    hyps = torch.stack(out, dim=1).tolist()
    return [h[: h.index(EOS_ID) + 1] if EOS_ID in h else h for h in hyps]


def test_overfits_32_pairs_until_greedy_output_is_the_targets():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (32,), generator=g)
    src = torch.stack([torch.cat([torch.randint(4, V, (n,), generator=g), torch.zeros(9 - n, dtype=torch.long)])
                       for n in lengths.tolist()])  # fmt: skip
    targets = [torch.randint(4, V, (n,), generator=g).tolist() + [EOS_ID] for n in (lengths + 1).tolist()]
    T = max(map(len, targets))
    tgt = torch.tensor([t + [PAD_ID] * (T - len(t)) for t in targets])  # (32, T)
    tgt_in = torch.cat([torch.full((32, 1), BOS_ID), tgt[:, :-1]], dim=1)
    model = Transformer(make_config("tiny", V, dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    for _ in range(400):
        sums = label_smoothed_nll_loss(model(src, tgt_in), tgt, epsilon=0.1)
        opt.zero_grad()
        (sums.loss / sums.tokens).backward()
        opt.step()
        if sums.nll.item() / sums.tokens.item() < 0.01:
            break
    with torch.no_grad():
        assert _greedy(model.eval(), src, T + 2) == targets


def test_rejects_sequences_beyond_max_positions(model):
    with pytest.raises(ValueError, match="max_positions 64"):
        model.encode(torch.ones(1, 65, dtype=torch.long))


def test_embedding_scale_and_positional_table():
    cfg = make_config("tiny", V, dropout=0.0)
    model = Transformer(cfg).eval()
    tokens = torch.tensor([[5, 6]])
    x = model.embed_tokens(tokens)
    expected = model.embed.weight[tokens] * math.sqrt(cfg.d_model) + model.pe[:2]
    torch.testing.assert_close(x, expected)
    pos, i = 3, 5  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)
    angle = pos / 10000 ** (2 * i / cfg.d_model)
    assert model.pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-7)
    assert model.pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-7)
    assert torch.equal(model.embed.weight[PAD_ID], torch.zeros(cfg.d_model))


def test_keep_scores_only_the_kept_positions(model):
    src = _padded_batch(SRC_LENGTHS, 9, seed=9)
    tgt = _padded_batch(TGT_LENGTHS, 8, seed=10)
    tgt_in = torch.cat([torch.full((3, 1), BOS_ID), tgt[:, :-1]], dim=1)
    keep = tgt.ne(PAD_ID)
    with torch.no_grad():
        full, kept = model(src, tgt_in), model(src, tgt_in, keep)
    assert kept.shape == (sum(TGT_LENGTHS), V)
    torch.testing.assert_close(kept, full[keep], atol=1e-5, rtol=0)
