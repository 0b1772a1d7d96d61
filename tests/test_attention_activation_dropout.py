"""Opt-in dropout of the attention weights and of the FFN's hidden units (`attention_dropout`,
`activation_dropout`; fairseq's flags of the same names), checked against their definitions."""

import pytest
import torch
from test_dropout import within_5_sigma  # the kept-share bound the paper's dropout is checked with
from torch import nn

from transformer.model import FeedForward, MultiHeadAttention, Transformer, attention_weights, make_config


def _identity_(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.out_features, linear.in_features))
        linear.bias.zero_()


@pytest.mark.parametrize("recording", [False, True])
def test_attention_dropout_drops_weights_and_scales_the_kept_by_1_over_1_minus_p(recording):
    # With values v_j = e_j (one-hot, d_k = S) and W^O = I, attention outputs its weights rows themselves.
    p, B, h, T, S = 0.3, 8, 2, 16, 16
    mha = MultiHeadAttention(h * S, h, self_attention=True, dropout=p).train()
    _identity_(mha.out_proj)
    mha.recorder = [] if recording else None
    q, k = torch.randn(B, h, T, S), torch.randn(B, h, S, S)
    v = torch.eye(S).expand(B, h, S, S)
    torch.manual_seed(0)
    out = mha.attend(q, k, v, None, causal=False).view(B, T, h, S).transpose(1, 2)  # (B, h, T, S)
    weights = attention_weights(q, k, None, causal=False)  # (B, h, T, S), undropped
    kept = out != 0
    torch.testing.assert_close(out[kept], weights[kept] / (1 - p), rtol=1e-5, atol=1e-6)
    assert within_5_sigma(kept.double().mean().item(), 1 - p, kept.numel())
    mha.eval()  # evaluation: the weights, undropped
    torch.testing.assert_close(mha.attend(q, k, v, None, causal=False).view(B, T, h, S).transpose(1, 2), weights)


def test_attention_dropout_of_everything_leaves_the_output_projection_bias():
    mha = MultiHeadAttention(16, 4, self_attention=True, dropout=1.0).train()
    out = mha(torch.randn(3, 5, 16))
    torch.testing.assert_close(out, mha.out_proj.bias.expand(3, 5, 16), rtol=0, atol=0)


def test_activation_dropout_drops_hidden_units_after_the_relu():
    p, d = 0.2, 64
    ffn = FeedForward(d, d, dropout=p).train()
    _identity_(ffn[2])  # W2 = I, b2 = 0: the output is the dropped-out hidden layer itself
    x = torch.randn(256, d)
    hidden = torch.relu(ffn[0](x)).detach()  # max(0, x W1 + b1)
    torch.manual_seed(0)
    out = ffn(x).detach()
    positive = hidden > 0
    kept = out != 0
    assert not (kept & ~positive).any()  # a unit the ReLU zeroed stays zero
    torch.testing.assert_close(out[kept], hidden[kept] / (1 - p), rtol=1e-4, atol=0)
    assert within_5_sigma(kept[positive].double().mean().item(), 1 - p, int(positive.sum()))
    assert torch.equal(ffn.eval()(x), torch.relu(ffn[0](x)))


def test_the_model_evaluates_as_without_them_and_keeps_its_parameter_names():
    # The same parameters load into either (checkpoints of the paper's model load into the opt-in one and back),
    # and in evaluation mode the two are the same function.
    plain = Transformer(make_config("tiny", vocab_size=40)).eval()
    extra = Transformer(make_config("tiny", vocab_size=40, attention_dropout=0.3, activation_dropout=0.3)).eval()
    assert plain.state_dict().keys() == extra.state_dict().keys()
    extra.load_state_dict(plain.state_dict())
    src, tgt_in = torch.randint(4, 40, (3, 7)), torch.randint(4, 40, (3, 6))
    with torch.no_grad():
        assert torch.equal(extra(src, tgt_in), plain(src, tgt_in))
        extra.train()
        torch.manual_seed(0)
        dropped = extra(src, tgt_in)
        plain.train()
        torch.manual_seed(0)
        assert not torch.allclose(dropped, plain(src, tgt_in))  # in training they are not
