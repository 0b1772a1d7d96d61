"""Label-smoothed cross-entropy (§5.4, ε_ls = 0.1; Szegedy et al. 2016), summed so distributed
averaging is exact: workers all-reduce the sums and the token count, then divide once.

The (tokens × V) log-probabilities are the largest tensors of a training step, so the gradient is written by
hand: for the smoothed target q, d loss / d logits = softmax(logits) - q, one pass over V instead of the
five or so that autograd makes through gather, sum and log_softmax (see bench/README.md).

`projected_label_smoothed_nll_loss` goes one step further for training: it takes the decoder's last hidden
states and the output projection, and never holds all (tokens × V) logits at once. Rows are projected, scored
and differentiated a chunk at a time in one reused buffer, and the gradients with respect to the hidden states
and the projection are formed in the forward pass, so backward only scales them (bench/README.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.model import PAD_ID

# Logit elements per chunk: 16 MiB of float32 on CPU (524 rows of an 8k vocabulary: as fast as larger chunks,
# measured from 131 to 1,048 rows); 256 MiB on GPUs, where larger GEMMs run faster.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


class LossSums(NamedTuple):
    loss: Tensor  # label-smoothed cross-entropy summed over non-pad tokens (the training objective)
    nll: Tensor  # plain negative log-likelihood summed over the same tokens (for perplexity)
    tokens: Tensor  # number of non-pad target tokens


def _scores(lprobs: Tensor, target: Tensor, keep: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """(loss, nll) summed over kept rows of log-probabilities (N, V): loss = (1-ε)·nll + ε/(V-1)·Σ_{k≠y} -log p_k."""
    V = lprobs.shape[-1]
    nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)  # (N,)
    others = -lprobs.sum(dim=1) - nll  # Σ over k ≠ y of -log p_k
    loss = (1.0 - epsilon) * nll + epsilon / (V - 1) * others
    zero = lprobs.new_zeros(())
    return torch.where(keep, loss, zero).sum(), torch.where(keep, nll, zero).sum()


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Per-token (loss, nll) summed over kept tokens, from logits (N, V); gradients for both outputs."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, keep: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 even under bf16
        lprobs = F.log_softmax(logits, dim=-1, dtype=dtype)  # (N, V)
        # An intermediate kept on ctx (not save_for_backward) so that backward may overwrite it in place:
        # on CPU a fresh (N, V) buffer costs page faults comparable to the arithmetic.
        ctx.lprobs, ctx.epsilon, ctx.logits_dtype = lprobs, epsilon, logits.dtype
        ctx.save_for_backward(target, keep)
        return _scores(lprobs, target, keep, epsilon)

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, grad_nll: Tensor | None):
        target, keep = ctx.saved_tensors
        if ctx.lprobs is None:
            raise RuntimeError("label_smoothed_nll_loss: backward twice through one loss (retain_graph) is unsupported")
        grad, ctx.lprobs = ctx.lprobs.exp_(), None  # softmax, in the log-probabilities' buffer
        V, eps = grad.shape[-1], ctx.epsilon
        eps_i = eps / (V - 1)
        zero = grad.new_zeros(())
        a = torch.where(keep, grad_loss if grad_loss is not None else zero, zero)  # (N,) weight of softmax - q
        b = torch.where(keep, grad_nll if grad_nll is not None else zero, zero)  # (N,) weight of softmax - onehot
        # q = ε/(V-1) everywhere but 1-ε at the reference, so
        # grad = softmax·(a+b) - a·ε/(V-1) - onehot·(a·(1-ε-ε/(V-1)) + b)
        grad.mul_((a + b).unsqueeze(1)).sub_((a * eps_i).unsqueeze(1))  # (N, V)
        grad.scatter_add_(1, target.unsqueeze(1), -(a * (1.0 - eps - eps_i) + b).unsqueeze(1))
        return grad.to(ctx.logits_dtype), None, None, None


def label_smoothed_nll_loss(
    logits: Tensor, target: Tensor, epsilon: float = 0.1, ignore_index: int = PAD_ID
) -> LossSums:
    """logits (..., V), target (...). The smoothed target puts 1 - ε on the reference and spreads ε
    uniformly over the other V - 1 classes, so loss = (1 - ε) · nll + ε/(V-1) · Σ_{k≠y} -log p_k."""
    V = logits.shape[-1]
    target = target.reshape(-1)  # (N,)
    keep = target.ne(ignore_index)
    loss, nll = _SmoothedCrossEntropy.apply(logits.reshape(-1, V), target, keep, float(epsilon))
    return LossSums(loss=loss, nll=nll, tokens=keep.sum())


def _uniform_and_onehot_products(
    hidden: Tensor, weight: Tensor, target: Tensor, keep: Tensor, u: float, c: float
) -> tuple[Tensor, Tensor]:
    """For C = u·1 - c·onehot(target) on kept rows, 0 elsewhere (N, V): C·W (N, d) and Cᵀ·h (V, d) without
    forming C, by a column sum and a gather, and a row sum and a scatter."""
    k = keep.unsqueeze(1).to(hidden.dtype)  # (N, 1)
    h = hidden * k
    c_w = k * (u * weight.sum(0) - c * weight[target])  # (N, d)
    c_h = (u * h.sum(0)).expand_as(weight) - c * torch.zeros_like(weight).index_add_(0, target, h)  # (V, d)
    return c_w, c_h


def _minus_smoothed_target_(p: Tensor, target: Tensor, keep: Tensor, u: float, c: float) -> Tensor:
    """p - q in place for q = u·1 + c·onehot(target) on kept rows (c, V); rows not kept become 0."""
    p.sub_(u).scatter_add_(1, target.unsqueeze(1), p.new_full((p.shape[0], 1), -c))
    return p.mul_(keep.unsqueeze(1))


class _ProjectedSmoothedCrossEntropy(torch.autograd.Function):
    """(loss, nll) of logits = hidden (N, d) · weightᵀ (V, d), chunk by chunk. With gradients needed, forward
    also forms the gradients of `loss`, (softmax - q)·W and (softmax - q)ᵀ·h over kept rows. As softmax - q =
    softmax - ε/(V-1)·1 - (1-ε-ε/(V-1))·onehot, in float32 only the softmax goes through the GEMMs and the rest is
    a cheap correction (`_uniform_and_onehot_products`); with bf16 GEMMs softmax - q is formed before rounding."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, target: Tensor, keep: Tensor, epsilon: float, chunk: int, grad_mode: bool
    ):
        # Under autocast the GEMMs run in its dtype (bf16 on GPUs), the scores in float32, as F.linear would;
        # autocast is then switched off, so that the dtypes below are the ones written.
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)  # scores and gradients: float32, or float64 if given
        h, w = hidden.to(dtype), weight.to(dtype)
        # needs_input_grad says only whether the inputs require gradients; under no_grad (validation) nothing
        # will call backward, so forming the gradients would triple the projection's work for nothing.
        grads = grad_mode and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        full = dtype == acc  # float32 or float64 GEMMs: the softmax goes in as is, q is corrected for after them
        if grads and full:
            h_kept = h if bool(keep.all()) else h * keep.unsqueeze(1).to(dtype)  # rows that count, for Pᵀ·h
        sums = torch.zeros(2, dtype=acc, device=hidden.device)  # loss, nll
        grad_h = torch.empty(h.shape, dtype=acc, device=h.device) if grads else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if grads else None
        # One buffer holds a chunk's logits, then its log-probabilities, then its softmax: fresh (c, V) tensors
        # each chunk would be unmapped and page-faulted again by the allocator (~15% of this function on CPU).
        buffer = h.new_empty(min(chunk, h.shape[0]), w.shape[0])  # (c, V)
        eps_i = epsilon / (w.shape[0] - 1)
        with torch.autocast(dev, enabled=False):
            for i in range(0, h.shape[0], chunk):
                rows = slice(i, i + chunk)
                logits = torch.mm(h[rows], w.t(), out=buffer[: h[rows].shape[0]])  # (c, V)
                if full:
                    lprobs = torch.log_softmax(logits, dim=-1, out=logits)  # each row reduced before it is written
                else:
                    lprobs = F.log_softmax(logits, dim=-1, dtype=acc)
                sums += torch.stack(_scores(lprobs, target[rows], keep[rows], epsilon))
                if not grads:
                    continue
                p = lprobs.exp_()  # softmax
                if full:
                    torch.mm(p, w, out=grad_h[rows])  # (c, d)
                    grad_w.addmm_(p.t(), h_kept[rows])  # (V, d)
                else:
                    # Rounded to 16 bits, softmax - q must be formed first: near convergence the two nearly cancel
                    # at the reference, and rounding the softmax alone (0.9 to within 2^-9) would swamp the difference.
                    p = _minus_smoothed_target_(p, target[rows], keep[rows], eps_i, 1 - epsilon - eps_i).to(dtype)
                    grad_h[rows] = p @ w
                    grad_w += p.t() @ h[rows]  # accumulated in float32
            if grads and full:  # softmax - q = softmax - ε/(V-1)·1 - (1 - ε - ε/(V-1))·onehot
                c_w, c_h = _uniform_and_onehot_products(h, w, target, keep, -eps_i, 1 - epsilon - eps_i)
                grad_h.mul_(keep.unsqueeze(1)).add_(c_w)
                grad_w.add_(c_h)
        ctx.grads, ctx.epsilon = (grad_h, grad_w), epsilon
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.save_for_backward(hidden, weight, target, keep)
        return sums[0], sums[1]

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, grad_nll: Tensor | None):
        if ctx.grads is None:
            raise RuntimeError("projected loss: backward twice through one loss (retain_graph) is unsupported")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        zero = grad_h.new_zeros(())
        a, b = (g if g is not None else zero for g in (grad_loss, grad_nll))
        # d(a·loss + b·nll)/d logits = (a+b)·(softmax - q) + b·D, D = q - onehot = ε/(V-1)·1 - (ε + ε/(V-1))·onehot:
        # the nll's gradient is the loss's plus a correction of the same cheap form.
        grad_h.mul_(a + b), grad_w.mul_(a + b)
        if grad_nll is not None:
            hidden, weight, target, keep = ctx.saved_tensors
            eps = ctx.epsilon
            eps_i = eps / (weight.shape[0] - 1)
            d_w, d_h = _uniform_and_onehot_products(
                hidden.to(grad_h.dtype), weight.to(grad_h.dtype), target, keep, eps_i, eps + eps_i
            )
            grad_h.add_(b * d_w), grad_w.add_(b * d_h)
        return grad_h.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None, None, None


def projected_label_smoothed_nll_loss(
    hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float = 0.1, ignore_index: int = PAD_ID
) -> LossSums:
    """`label_smoothed_nll_loss(hidden @ weight.T, target)` for hidden (..., d) and the output projection
    weight (V, d), without materialising the (..., V) logits: the same sums, with less memory and time."""
    d, V = hidden.shape[-1], weight.shape[0]
    target = target.reshape(-1)  # (N,)
    keep = target.ne(ignore_index)
    chunk = max(1, CHUNK_ELEMENTS.get(hidden.device.type, CHUNK_ELEMENTS["cuda"]) // V)
    loss, nll = _ProjectedSmoothedCrossEntropy.apply(
        hidden.reshape(-1, d), weight, target, keep, float(epsilon), chunk, torch.is_grad_enabled()
    )
    return LossSums(loss=loss, nll=nll, tokens=keep.sum())
