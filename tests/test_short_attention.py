"""Attention on a CPU takes one of two paths (`transformer.model.short_attention`): SDPA's fused kernel, or for
short sequences the weights by matmuls and a softmax. Both compute softmax(QKᵀ/√d_k)V (§3.2.1): the same values
and gradients up to float rounding, with padding masks, causal masks and cross-attention; and each shape takes
the path the rule names."""

import pytest
import torch
import torch.nn.functional as F
from tolerance import tol

import transformer.model as model_module
from transformer.model import BOS_ID, PAD_ID, MultiHeadAttention, Transformer, make_config, short_attention

V = 40


def sdpa_calls(monkeypatch) -> list[int]:
    """A list that gains an element at every call of `F.scaled_dot_product_attention` from the model."""
    calls: list[int] = []
    sdpa = F.scaled_dot_product_attention
    counting = lambda *a, **k: calls.append(1) or sdpa(*a, **k)  # noqa: E731
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", counting)
    return calls


def _inputs(B: int, T: int, S: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, 4, n, 16, generator=g, requires_grad=True) for n in (T, S, S))  # (B, h, *, d_k)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S): each row sees ≥ 1 key
    return q, k, v, mask, torch.randn(B, T, 64, generator=g)


@pytest.mark.parametrize(
    "T, S, masked, causal",
    [(7, 7, True, False), (7, 7, False, True), (5, 9, True, False), (12, 12, False, False)],
    ids=["encoder-padded", "decoder-causal", "cross-padded", "unmasked"],
)
def test_matmuls_and_sdpa_give_the_same_outputs_and_gradients(monkeypatch, T, S, masked, causal):
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 4, self_attention=True).train()  # attention dropout 0: deterministic
    q, k, v, mask, grad = _inputs(3, T, S, seed=T + S)
    mask = mask if masked else None
    results = {}
    for keys in (model_module.SHORT_KEYS, 0):  # the shipped rule (matmuls here), then SDPA for every shape
        monkeypatch.setattr(model_module, "SHORT_KEYS", keys)
        assert short_attention(q, k) == (keys > 0)
        out = mha.attend(q, k, v, mask, causal)  # (B, T, d_model)
        out.backward(grad)
        results[keys] = [out.detach()] + [x.grad.clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
    # Each output sums S weighted values (magnitude ~1) and 64 products through W^O: float32 rounding of that order.
    for a, b in zip(*results.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=tol(float(b.abs().max()), terms=S + 64))


def test_a_whole_model_gives_the_same_loss_and_gradients_either_way(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", V, max_positions=64)).train()
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, V, (4, 11), generator=g)
    src[1, 6:] = PAD_ID  # a padded source: the encoder's and the cross-attention's masks matter
    tgt = torch.randint(4, V, (4, 9), generator=g)
    tgt_in = torch.cat([torch.full((4, 1), BOS_ID), tgt[:, :-1]], dim=1)
    results = {}
    for keys in (model_module.SHORT_KEYS, 0):
        monkeypatch.setattr(model_module, "SHORT_KEYS", keys)
        torch.manual_seed(1)  # the same dropout masks for both paths
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt.flatten())
        model.zero_grad()
        loss.backward()
        results[keys] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(*results.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=tol(float(b.abs().max()), terms=64 * 8))


def test_each_shape_takes_the_path_the_rule_names(monkeypatch):
    calls = sdpa_calls(monkeypatch)
    torch.manual_seed(0)
    cfg = make_config("tiny", V, max_positions=256)
    model = Transformer(cfg).eval()
    layers = cfg.encoder_layers + 2 * cfg.decoder_layers
    short, long = model_module.SHORT_KEYS, model_module.SHORT_KEYS + 1
    with torch.no_grad():
        model(torch.randint(4, V, (2, short)), torch.randint(4, V, (2, short)))
        assert calls == []  # whole sequences of up to SHORT_KEYS tokens: matmuls in every layer
        model(torch.randint(4, V, (2, long)), torch.randint(4, V, (2, long)))
        assert len(calls) == layers  # one key more: SDPA in every layer
        calls.clear()
        state = model.init_state(model.encode(torch.randint(4, V, (2, 5))), 8)
        model.decode_step(torch.full((2,), BOS_ID), state)
        # One query: the decoder's self-attention stays on SDPA; cross-attention too (one query per sentence).
        assert len(calls) == 2 * cfg.decoder_layers
    q = torch.zeros(1, 4, 9, 16, device="meta")  # any device but the CPU (GPUs) keeps SDPA's fused kernels
    assert not short_attention(q, q) and short_attention(torch.zeros(q.shape), torch.zeros(q.shape))
