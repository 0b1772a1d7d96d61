"""Label-smoothed cross-entropy (§5.4) against numbers derived by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

import transformer.loss
from transformer.loss import label_smoothed_nll_loss, projected_label_smoothed_nll_loss


def test_uniform_prediction_costs_log_v_whatever_the_smoothing():
    # p_k = 1/4 for all k: every -log p_k = log 4, and the smoothed target's weights sum to 1.
    logits = torch.zeros(2, 3, 4)
    target = torch.tensor([[1, 2, 0], [3, 0, 0]])  # 0 = pad: 3 real tokens
    sums = label_smoothed_nll_loss(logits, target, epsilon=0.1)
    assert sums.tokens.item() == 3
    assert sums.nll.item() == pytest.approx(3 * math.log(4), rel=1e-6)
    assert sums.loss.item() == pytest.approx(3 * math.log(4), rel=1e-6)


def test_known_distribution_by_hand():
    # p = (1/2, 1/4, 1/8, 1/8), reference class 0, V = 4, ε = 0.1:
    # nll = log 2; Σ_{k≠0} -log p_k = 2 log 2 + 3 log 2 + 3 log 2 = 8 log 2;
    # loss = 0.9 · log 2 + (0.1 / 3) · 8 log 2 = (0.9 + 0.8/3) log 2.
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    sums = label_smoothed_nll_loss(p.log().view(1, 1, 4), torch.tensor([[0]]), epsilon=0.1, ignore_index=-1)
    assert sums.nll.item() == pytest.approx(math.log(2), rel=1e-6)
    assert sums.loss.item() == pytest.approx((0.9 + 0.8 / 3) * math.log(2), rel=1e-6)


def test_minimum_is_at_the_smoothed_target():
    # The loss is the cross-entropy with q = (1-ε) on the reference, ε/(V-1) elsewhere; d loss/d logits = p - q.
    V, eps, y = 5, 0.1, 2
    q = torch.full((V,), eps / (V - 1))
    q[y] = 1 - eps
    logits = q.log().clone().requires_grad_(True)
    label_smoothed_nll_loss(logits.view(1, V), torch.tensor([y]), epsilon=eps, ignore_index=-1).loss.backward()
    torch.testing.assert_close(logits.grad, torch.zeros(V), atol=1e-6, rtol=0)


def test_no_smoothing_is_cross_entropy_and_pads_are_ignored():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=g)
    target = torch.randint(1, 11, (4, 6), generator=g)
    target[1, 3:] = 0
    sums = label_smoothed_nll_loss(logits, target, epsilon=0.0)
    ce = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=0, reduction="sum")
    torch.testing.assert_close(sums.loss, ce)
    torch.testing.assert_close(sums.nll, ce)
    assert sums.tokens.item() == 4 * 6 - 3


def test_sums_add_up_across_shards():
    # What distributed training relies on: the loss of a batch is the sum of its halves' losses.
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(6, 5, 9, generator=g), torch.randint(0, 9, (6, 5), generator=g)
    whole = label_smoothed_nll_loss(logits, target)
    halves = [label_smoothed_nll_loss(logits[i : i + 3], target[i : i + 3]) for i in (0, 3)]
    for field in ("loss", "nll", "tokens"):
        torch.testing.assert_close(getattr(whole, field), sum(getattr(h, field) for h in halves))


def test_bf16_logits_are_scored_in_float32():
    logits = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    sums = label_smoothed_nll_loss(logits, torch.tensor([[1, 2]]))
    assert sums.loss.dtype == torch.float32
    assert sums.loss.item() == pytest.approx(2 * math.log(4), rel=1e-6)


def _autograd_reference(logits, target, epsilon, ignore_index=0):
    """The loss written plainly, differentiated by autograd: the hand-written gradient must agree with it."""
    V = logits.shape[-1]
    lprobs = F.log_softmax(logits, dim=-1).reshape(-1, V)
    target = target.reshape(-1)
    keep = target.ne(ignore_index)
    nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = (1 - epsilon) * nll + epsilon / (V - 1) * (-lprobs.sum(dim=1) - nll)
    return (loss * keep).sum(), (nll * keep).sum()


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_hand_written_gradient_equals_autograd(epsilon):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, 13, generator=g, dtype=torch.float64)
    target = torch.randint(0, 13, (5, 7), generator=g)
    target[0, 4:] = 0
    grads = []
    for fn in (label_smoothed_nll_loss, _autograd_reference):
        x = logits.clone().requires_grad_(True)
        loss, nll = fn(x, target, epsilon)[:2]
        (2.0 * loss + 3.0 * nll).backward()  # both outputs carry gradient
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)
    assert grads[0][0, 4:].abs().max() == 0  # padded positions get no gradient


def test_second_backward_through_one_loss_is_refused_clearly():
    x = torch.randn(3, 5, requires_grad=True)
    sums = label_smoothed_nll_loss(x, torch.tensor([1, 2, 3]))
    sums.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        sums.loss.backward()


# --- the projected loss: logits = hidden · Wᵀ formed a chunk of rows at a time ---


def _projection_case(dtype=torch.float64, N=23, d=6, V=11, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, dtype=dtype)
    weight = torch.randn(V, d, generator=g, dtype=dtype)
    target = torch.randint(1, V, (N,), generator=g)
    target[[2, 9, 10]] = 0  # pads
    return hidden, weight, target


@pytest.fixture(params=[1, 4, 1000], ids=["1-row", "4-row", "one"])
def chunk_rows(request, monkeypatch):
    # V = 11 columns: these element budgets give chunks of 1 row, 4 rows, and all 23 rows at once.
    monkeypatch.setitem(transformer.loss.CHUNK_ELEMENTS, "cpu", 11 * request.param)
    return request.param


@pytest.mark.parametrize("weights", [(2.0, 3.0), (1.0, None), (None, 1.0)], ids=["both", "loss", "nll"])
def test_projected_loss_sums_and_gradients_equal_autograd_through_the_logits(chunk_rows, weights):
    hidden, weight, target = _projection_case()
    results = []
    for projected in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if projected:
            loss, nll = projected_label_smoothed_nll_loss(h, w, target, epsilon=0.1)[:2]
        else:
            loss, nll = _autograd_reference(h @ w.t(), target, 0.1)
        sum(c * out for c, out in zip(weights, (loss, nll), strict=True) if c is not None).backward()
        results.append((loss.detach(), nll.detach(), h.grad, w.grad))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    assert results[0][2][[2, 9, 10]].abs().max() == 0  # pads get no gradient


def test_projected_loss_without_gradients_gives_the_same_sums(chunk_rows):
    hidden, weight, target = _projection_case(torch.float32)
    with torch.no_grad():
        ours = projected_label_smoothed_nll_loss(hidden, weight, target, epsilon=0.1)
        ref = label_smoothed_nll_loss(hidden @ weight.t(), target, epsilon=0.1)
    for field in ("loss", "nll", "tokens"):
        torch.testing.assert_close(getattr(ours, field), getattr(ref, field), rtol=1e-6, atol=1e-5)


def test_projected_loss_under_bf16_autocast_projects_in_bf16_and_scores_in_float32():
    hidden, weight, target = _projection_case(torch.float32, N=40, d=16, V=50)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = projected_label_smoothed_nll_loss(h, w, target)
        ref = label_smoothed_nll_loss(F.linear(hidden, weight), target)  # F.linear: bf16 logits under autocast
    assert ours.loss.dtype == torch.float32
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-4)  # both score the same bf16 logits
    ours.loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    label_smoothed_nll_loss(h32 @ w32.t(), target).loss.backward()
    torch.testing.assert_close(h.grad, h32.grad, rtol=0.05, atol=0.05)  # bf16 rounding of the GEMM inputs
    torch.testing.assert_close(w.grad, w32.grad, rtol=0.05, atol=0.05)


def test_projected_loss_under_no_grad_runs_only_the_projection_gemm():
    # Validation: the weights require gradients but no backward will come, so only logits = h·Wᵀ is computed
    # (2·N·d·V FLOPs), not the two gradient GEMMs on top.
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, target = _projection_case(torch.float32, N=40, d=16, V=50)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    flops = {}
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode), FlopCounterMode(display=False) as counter:
            projected_label_smoothed_nll_loss(h, w, target)
        flops[grad_mode] = counter.get_total_flops()
    assert flops[False] == 2 * 40 * 16 * 50
    assert flops[True] > flops[False]  # the same call with gradients wanted forms them


def _confident_case(N=64, d=32, V=1000, seed=5):
    """Hidden states close to their target's embedding: the softmax puts most of its mass on the reference, as
    near convergence, where softmax and smoothed target nearly cancel."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, d, generator=g) / d**0.25
    target = torch.randint(1, V, (N,), generator=g)
    hidden = 5.0 * weight[target] / d**0.25 + 0.3 * torch.randn(N, d, generator=g)
    target[:4] = 0  # pads
    return hidden, weight, target


def test_projected_loss_gradients_under_bf16_are_as_accurate_as_autocasts_own():
    # The bf16 GEMMs get softmax - q rounded, as autograd through autocast's bf16 logits does, not the softmax
    # rounded and q subtracted later, which loses the difference where the two nearly cancel.
    hidden, weight, target = _confident_case()
    grads = {}
    for name in ("float64", "ours", "autocast"):
        h = hidden.double() if name == "float64" else hidden.clone()
        w = weight.double() if name == "float64" else weight.clone()
        h.requires_grad_(True), w.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "float64"):
            if name == "autocast":
                sums = label_smoothed_nll_loss(F.linear(h, w), target)
            else:
                sums = projected_label_smoothed_nll_loss(h, w, target)
        sums.loss.backward()
        grads[name] = (h.grad.double(), w.grad.double())
    p_ref = torch.softmax(hidden.double() @ weight.double().t(), -1).gather(1, target[:, None]).squeeze(1)[4:]
    assert p_ref.mean() > 0.7  # the case is the confident one it is meant to be
    for i in (0, 1):
        ref = grads["float64"][i]
        errors = {k: ((grads[k][i] - ref).norm() / ref.norm()).item() for k in ("ours", "autocast")}
        assert errors["ours"] <= 1.1 * errors["autocast"], errors


def test_second_backward_through_one_projected_loss_is_refused_clearly():
    hidden, weight, target = _projection_case(torch.float32)
    sums = projected_label_smoothed_nll_loss(hidden.requires_grad_(True), weight, target)
    sums.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        sums.loss.backward()
