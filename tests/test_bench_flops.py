"""The model-FLOPs count behind the utilisation figures of bench/ (train_step.py, gpu_mfu.py), against
torch's own FLOP counter on a forward pass."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import batch_flops, forward_flops
from transformer.model import Transformer, make_config

S, T, B = 7, 5, 3  # source length, target length, sentences (no padding)


def test_matmul_flops_equal_torchs_count_of_a_forward_pass():
    cfg = make_config("tiny", 50, d_model=16, d_ff=24, heads=2, encoder_layers=2, decoder_layers=3, dropout=0.0)
    model = Transformer(cfg).eval()
    src, tgt_in = torch.randint(4, 50, (B, S)), torch.randint(4, 50, (B, T))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(src, tgt_in)
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    d = cfg.d_model
    # Attention score and weighted-sum products are not mm/addmm (SDPA); take them out of ours by hand.
    attention = cfg.encoder_layers * 4 * S * S * d + cfg.decoder_layers * (2 * T * T * d + 4 * T * S * d)
    assert B * (forward_flops(cfg, S, T) - attention) == matmuls


def test_batch_flops_count_real_tokens_only_and_three_forward_passes():
    cfg = make_config("tiny", 50, d_model=16, d_ff=24, heads=2, encoder_layers=1, decoder_layers=1, dropout=0.0)
    src = torch.tensor([[5, 6, 3, 0], [5, 6, 7, 3]])  # lengths 3 and 4 (eos 3, pad 0)
    tgt = torch.tensor([[8, 3, 0], [8, 9, 3]])  # lengths 2 and 3
    expected = 3 * (forward_flops(cfg, 3, 2) + forward_flops(cfg, 4, 3))
    assert batch_flops(cfg, src, tgt) == expected
