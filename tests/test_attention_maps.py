"""The attention hook: it reads out what SDPA computes without changing it, its maps are the paper's
softmax(QKᵀ/√d_k) (derived by hand for one layer), a cached decode gives the maps of a full decode, and
when nobody listens the model runs SDPA as before."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_short_attention import sdpa_calls  # the counting stand-in for SDPA

import transformer.model as model_module
from transformer.attention_maps import AttentionMaps, record_attention, teacher_forced_maps
from transformer.model import BOS_ID, PAD_ID, Transformer, make_config

V = 40


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(make_config("tiny", V, max_positions=64, decoder_layers=3)).eval()
    with torch.no_grad():  # non-zero biases, so a projection left out of the hand derivation would show
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def batch(lengths: list[int], T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, V, (len(lengths), T), generator=g)
    for i, n in enumerate(lengths):
        x[i, n:] = PAD_ID
    return x


SRC = batch([9, 5, 7], 9, seed=1)
OUT = batch([8, 8, 3], 8, seed=2)  # output tokens; the decoder reads bos + OUT[:, :-1]
TGT_IN = torch.cat([torch.full((3, 1), BOS_ID), OUT[:, :-1]], dim=1)


def test_recording_does_not_change_the_output(model):
    with torch.no_grad():
        plain = model(SRC, TGT_IN)
        with record_attention(model):
            recorded = model(SRC, TGT_IN)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)


def test_maps_have_the_paper_shapes_rows_sum_to_one_and_hide_padding_and_the_future(model):
    maps = teacher_forced_maps(model, SRC, OUT)
    cfg = model.cfg
    assert [len(m) for m in maps] == [cfg.encoder_layers, cfg.decoder_layers, cfg.decoder_layers]
    assert maps.encoder[0].shape == (3, cfg.heads, 9, 9)
    assert maps.decoder[0].shape == (3, cfg.heads, 8, 8)
    assert maps.cross[0].shape == (3, cfg.heads, 8, 9)
    for m in (*maps.encoder, *maps.decoder, *maps.cross):
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))
    src_pad = SRC.eq(PAD_ID)[:, None, None, :]  # (B, 1, 1, S)
    for m in (*maps.encoder, *maps.cross):
        assert m.masked_select(src_pad).eq(0).all()  # no weight on source padding
    future = torch.ones(8, 8, dtype=torch.bool).triu(1)
    for m in maps.decoder:
        assert m[..., future].eq(0).all()  # query i sees positions 0..i only
        assert m[..., ~future].gt(0).all()


def test_encoder_map_is_softmax_of_scaled_query_key_products_derived_by_hand(model):
    maps = teacher_forced_maps(model, SRC, OUT)
    attn = model.encoder[0].self_attn
    with torch.no_grad():
        x = model.embed(SRC) * math.sqrt(model.cfg.d_model) + model.pe[:9]  # layer 0's input (eval: no dropout)
        q, k, _ = F.linear(x, attn.in_proj.weight, attn.in_proj.bias).chunk(3, dim=-1)
        h, d_k = attn.heads, attn.d_k
        q, k = (t.view(3, 9, h, d_k).transpose(1, 2) for t in (q, k))  # (B, h, S, d_k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_k)
        scores = scores.masked_fill(SRC.eq(PAD_ID)[:, None, None, :], -math.inf)
        expected = torch.exp(scores - scores.amax(-1, keepdim=True))
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(maps.encoder[0], expected, atol=1e-6, rtol=1e-5)


def test_cached_decoding_gives_the_maps_of_a_full_decode(model):
    full = teacher_forced_maps(model, SRC, OUT)
    with torch.no_grad(), record_attention(model) as calls:
        state = model.init_state(model.encode(SRC), max_len=8)
        for t in range(8):
            model.decode_step(TGT_IN[:, t], state)
    assert len(calls["decoder.0.self_attn"]) == 8  # one query row per step
    cached = AttentionMaps.from_calls(model, calls)
    for a, b in zip(cached, full, strict=True):
        for layer_a, layer_b in zip(a, b, strict=True):
            torch.testing.assert_close(layer_a, layer_b, atol=1e-6, rtol=1e-5)


def test_one_sentence_of_the_batch(model):
    maps = teacher_forced_maps(model, SRC, OUT)
    one = maps.sentence(1)
    torch.testing.assert_close(one.cross[2], maps.cross[2][1])
    assert one.encoder[0].dim() == 3


def test_nobody_listening_runs_sdpa_and_a_failed_block_stops_listening(model, monkeypatch):
    monkeypatch.setattr(model_module, "SHORT_KEYS", 0)  # SDPA at every length, as on a GPU
    used = sdpa_calls(monkeypatch)
    with torch.no_grad():
        model(SRC, TGT_IN)
        assert len(used) == model.cfg.encoder_layers + 2 * model.cfg.decoder_layers
        used.clear()
        with pytest.raises(RuntimeError), record_attention(model):
            model(SRC, TGT_IN)
            assert not used  # recording forms the weights itself
            raise RuntimeError("interrupted")
        assert all(m.recorder is None for m in model.modules() if hasattr(m, "recorder"))
        model(SRC, TGT_IN)
    assert used


def test_training_mode_is_restored(model):
    model.train()
    teacher_forced_maps(model, SRC, OUT)
    assert model.training
