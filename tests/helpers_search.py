"""A tiny Transformer half-taught to copy, and what the search tests measure it with (test_search, test_ensemble)."""

import torch
import torch.nn.functional as F

from transformer.model import BOS_ID, EOS_ID, PAD_ID, Transformer, make_config

V = 24


def copy_batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources of 2..8 random tokens + eos, padded; the target is the source."""
    lengths = torch.randint(2, 9, (n,), generator=gen)
    src = torch.full((n, 9), PAD_ID)
    for i, length in enumerate(lengths.tolist()):
        src[i, :length] = torch.randint(4, V, (length,), generator=gen)
        src[i, length] = EOS_ID
    return src, src.clone()


def copy_model(seed: int = 0) -> Transformer:
    """A tiny Transformer half-taught to copy: it emits eos near the source length, not always right."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    m = Transformer(make_config("tiny", V, dropout=0.0))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(60):
        src, tgt = copy_batch(gen, 32)
        tgt_in = torch.cat([torch.full((32, 1), BOS_ID), tgt[:, :-1]], dim=1)
        loss = F.cross_entropy(m(src, tgt_in).transpose(1, 2), tgt, ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def strip(src: torch.Tensor) -> torch.Tensor:
    """One sentence (S,) without its padding, as a batch of one."""
    return src[src.ne(PAD_ID)][None]


def sequence_logprob(model: Transformer, src: torch.Tensor, tokens: list[int]) -> float:
    """log P(tokens + eos | src) from one teacher-forced pass over the whole sequence (no cache)."""
    tgt = torch.tensor([[*tokens, EOS_ID]])
    tgt_in = torch.cat([torch.tensor([[BOS_ID]]), tgt[:, :-1]], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(src, tgt_in).double(), dim=-1)
    return logp.gather(2, tgt[:, :, None]).sum().item()
