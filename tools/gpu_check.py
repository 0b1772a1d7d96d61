"""GPU acceptance in one script: what a GPU run of the pipeline relies on, checked on the device in minutes.

    python -m tools.gpu_check --out gpu_check.json          # one CUDA GPU, about 2-4 minutes
    python -m tools.gpu_check --device cpu --tiny           # the same checks, tiny, < 1 min

Needs torch, numpy and this repository's `transformer/` only (no Ray, DVC, MLflow, sentencepiece or network), so
it runs on a bare GPU box with `pip install torch numpy`. Checks, each a row of the table and of the JSON:

1. train_base, train_big: the real `transformer.training.Trainer` at the paper's budget (§5.1): updates of
   25,000 tokens (padding counted) cut into micro-batches of at most 4,096 (train.update_tokens / max_tokens:
   7 micro-batches with gradient accumulation, as the train stage runs them), sentence lengths like WMT14's
   BPE (mean ~28 tokens, lognormal), V = 37,000, bf16 autocast. Target tokens/s, model-FLOPs utilisation
   against a bf16 matmul peak measured here (FLOPs counted by bench/common.py on real tokens only, as
   bench/gpu_mfu.py does) and torch.cuda.max_memory_allocated. Passes if every update is finite.
2. cache_fp32, cache_bf16: incremental decoding with the cache (`decode_step`) gives the log-probabilities of
   full teacher-forced decoding (`forward`) on a padded batch: max |Δ log p| ≤ 1e-4 in float32, ≤ 0.1 under
   bf16 autocast (both paths round differently to bf16's 8 bits; log p of a random base model is about -10.5).
3. loss_grad_bf16: the gradients of `projected_label_smoothed_nll_loss` under bf16 autocast against float32,
   relative error (‖g_bf16 − g_fp32‖ / ‖g_fp32‖) ≤ 2% for ∂/∂h and ∂/∂W (bench/README: autocast's own is ~1%).
4. beam_decode: beam 4, α 0.6 of base (random weights) over 3,003 newstest-like sources (lengths lognormal, mean
   ~33 tokens), batches of 8,000 source tokens, bf16 autocast: sentences/s. Random weights never pick eos, so
   each sentence runs to its maximum length, capped here at its source length (max_len_a 1, max_len_b 0),
   about where a trained model stops; the paper's source + 50 would be ~2.5x the steps.
5. learns: 100 updates of the Trainer on corpus/sample-en-de with a word-level vocabulary built here (no
   sentencepiece), tiny model, warm-up 20: the mean loss of the last 10 updates and the validation loss must be
   below 3/4 of the first update's (measured on CPU: 6.8 -> 4.3; label smoothing keeps it well above 0).

On CPU (`--device cpu`) everything runs in float32 except the two bf16 checks (2, 3), which are the point and
are small enough with `--tiny`; CPUs without native bf16 run it ~100x slower than float32 (STACK-FACTS).
Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from bench.common import forward_flops, matmul_peak_flops
from transformer.batching import PackedCorpus, pad_right, translation_batches
from transformer.beam_search import beam_search
from transformer.loss import projected_label_smoothed_nll_loss
from transformer.model import BOS_ID, EOS_ID, PAD_ID, Transformer, make_config
from transformer.training import Hooks, Trainer, TrainingConfig

REPO = Path(__file__).resolve().parents[1]

FULL = {  # the paper's sizes on a GPU
    "vocab": 37_000, "update_tokens": 25_000, "max_tokens": 4096, "pairs": 20_000, "warmup": 2, "updates": 6,
    "presets": ("base", "big"), "decode_sentences": 3003, "decode_tokens": 8000, "loss_rows": 8192,
    "loss_d": 512, "peak_n": 8192,
    "learn_model": {"arch": "tiny"}, "learn_tokens": 4000,
}  # fmt: skip
TINY = {  # the same checks at a size a 2-core CPU runs in seconds
    "vocab": 1000, "update_tokens": 2000, "max_tokens": 1000, "pairs": 2000, "warmup": 1, "updates": 2,
    "presets": ("tiny",), "decode_sentences": 40, "decode_tokens": 1000, "loss_rows": 256,
    "loss_d": 64, "peak_n": 512, "learn_tokens": 600,
    "learn_model": {"arch": "tiny", "d_model": 32, "d_ff": 128, "heads": 2, "encoder_layers": 1, "decoder_layers": 1},
}  # fmt: skip
TOLERANCE = {"cache_fp32": 1e-4, "cache_bf16": 0.1, "loss_grad_bf16": 0.02}


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def synthetic_corpus(pairs: int, vocab: int, seed: int, mean: float = 28.0) -> PackedCorpus:
    """BPE-like lengths (lognormal, mean `mean`, target correlated, at most 250 + eos) of random ids."""
    rng = np.random.default_rng(seed)
    src = np.clip(np.rint(rng.lognormal(math.log(mean) - 0.21, 0.65, pairs)), 1, 250).astype(np.int64)
    tgt = np.clip(np.rint(src * np.exp(rng.normal(0.0, 0.15, pairs))), 1, 250).astype(np.int64)

    def side(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = rng.integers(4, vocab, int(lengths.sum() + len(lengths))).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths + 1)])
        tokens[offsets[1:] - 1] = EOS_ID
        return tokens, offsets

    return PackedCorpus(*side(src), *side(tgt))


class Timer(Hooks):
    def __init__(self, device: torch.device):
        self.device, self.times, self.steps = device, [time.perf_counter()], []

    def on_update(self, trainer: Trainer, step) -> None:
        self.times.append(time.perf_counter())  # train_step ends in .tolist(): the device has finished
        self.steps.append(step)


def check_train(preset: str, size: dict, device: torch.device, peak: float) -> dict:
    """Updates of `preset` at the paper's budget through the real Trainer; tokens/s, MFU, memory."""
    cfg = make_config(preset, size["vocab"])
    data = synthetic_corpus(size["pairs"], size["vocab"], seed=1)
    n = size["warmup"] + size["updates"]
    training = TrainingConfig(
        update_tokens=size["update_tokens"], max_tokens=size["max_tokens"], max_updates=n, warmup=4000,
        validate_every_updates=10**9, log_every_updates=10**9, checkpoint_every_minutes=None,
        precision="bf16" if device.type == "cuda" else "float32",
    )  # fmt: skip
    trainer = Trainer(cfg, training, data, None, device)
    trainer.checkpoint = lambda hooks: None  # the check measures training, not checkpoint writes
    batches = trainer.plan.epoch(1)[:n]  # what updates 1..n train on (epoch 1 from its start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = Timer(device)
    trainer.fit(timer)
    w = size["warmup"]
    seconds = timer.times[-1] - timer.times[w]
    flops = sum(3 * forward_flops(cfg, int(data.src_lengths[i]), int(data.tgt_lengths[i]))
                for b in batches[w:] for m in b for i in m)  # fmt: skip
    tokens = sum(s.tokens for s in timer.steps[w:])
    finite = all(s.applied and math.isfinite(s.loss) for s in timer.steps)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    shown = f"{memory:.1f} GiB" if memory is not None else "memory n/a on CPU"
    return {
        "check": f"train_{preset}",
        "passed": finite,
        "measured": f"{tokens / seconds:,.0f} target tok/s, MFU {flops / seconds / peak:.1%}, {shown}",
        "target_tokens_per_s": tokens / seconds,
        "mfu": flops / seconds / peak,
        "seconds_per_update": seconds / size["updates"],
        "max_memory_allocated_gib": memory,
        "micro_batches_per_update": trainer.plan.micro_per_update,
        "criterion": f"{size['updates']} updates of {size['update_tokens']:,} tokens in micro-batches of "
        f"<= {trainer.plan.micro_tokens:,}, all finite",
    }


def padded_batch(size: dict, device: torch.device, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """src (n, S) and tgt_in (n, T) = bos + target, of different lengths, right-padded."""
    g = torch.Generator().manual_seed(3)
    src, tgt = [], []
    for i in range(n):
        s, t = 40 - 3 * i, 30 - 2 * i
        src.append([*torch.randint(4, size["vocab"], (s - 1,), generator=g).tolist(), EOS_ID])
        tgt.append([BOS_ID, *torch.randint(4, size["vocab"], (t - 1,), generator=g).tolist()])
    return pad_right(src).to(device), pad_right(tgt).to(device)


@torch.inference_mode()
def check_cache(size: dict, device: torch.device, bf16: bool) -> dict:
    """decode_step position by position, with the cache, against forward over the whole target."""
    torch.manual_seed(0)
    model = Transformer(make_config(size["presets"][0], size["vocab"], dropout=0.0)).to(device).eval()
    src, tgt_in = padded_batch(size, device)
    real = tgt_in.ne(PAD_ID)  # (B, T) positions that exist
    with autocast(device, bf16):
        full = torch.log_softmax(model(src, tgt_in).float(), dim=-1)  # (B, T, V)
        state = model.init_state(model.encode(src), tgt_in.shape[1])
        steps = [model.decode_step(tgt_in[:, t], state) for t in range(tgt_in.shape[1])]  # (B, V) each
    cached = torch.stack(steps, dim=1)
    diff = float((full - cached).abs()[real].max())
    name = "cache_bf16" if bf16 else "cache_fp32"
    return {
        "check": name,
        "passed": diff <= TOLERANCE[name],
        "measured": f"max |Δ log p| {diff:.2e}",
        "max_abs_diff": diff,
        "criterion": f"<= {TOLERANCE[name]:g} over {int(real.sum())} positions of a padded batch",
    }


def check_loss_grad(size: dict, device: torch.device) -> dict:
    """Gradients of the projected loss under bf16 autocast against float32, for hidden states and W."""
    g = torch.Generator(device=device).manual_seed(5)
    d = size["loss_d"]
    h0 = torch.randn(size["loss_rows"], d, generator=g, device=device)
    w0 = torch.randn(size["vocab"], d, generator=g, device=device) * d**-0.5
    target = torch.randint(4, size["vocab"], (size["loss_rows"],), generator=g, device=device)
    target[-size["loss_rows"] // 8 :] = PAD_ID  # some padding, as in training

    def grads(bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with autocast(device, bf16):
            sums = projected_label_smoothed_nll_loss(h, w, target, 0.1)
        (sums.loss / sums.tokens).backward()
        return h.grad.float(), w.grad.float()

    ref, low = grads(False), grads(True)
    errors = [float((b - a).norm() / a.norm()) for a, b in zip(ref, low, strict=True)]
    return {
        "check": "loss_grad_bf16",
        "passed": max(errors) <= TOLERANCE["loss_grad_bf16"],
        "measured": f"relative error dL/dh {errors[0]:.2%}, dL/dW {errors[1]:.2%}",
        "relative_error_hidden": errors[0],
        "relative_error_weight": errors[1],
        "criterion": f"<= {TOLERANCE['loss_grad_bf16']:.0%} (N {size['loss_rows']}, d {d}, V {size['vocab']})",
    }


@torch.inference_mode()
def check_beam(size: dict, device: torch.device) -> dict:
    """Beam 4 over newstest-like sources in token-budget batches; sentences/s."""
    torch.manual_seed(0)
    model = Transformer(make_config(size["presets"][0], size["vocab"], dropout=0.0)).to(device).eval()
    data = synthetic_corpus(size["decode_sentences"], size["vocab"], seed=7, mean=33.0)
    bf16 = device.type == "cuda"
    start, done, out_tokens = time.perf_counter(), 0, 0
    for batch in translation_batches(data.src_lengths, size["decode_tokens"]):  # longest first, as decode does
        src = pad_right([data[int(i)][0] for i in batch])
        with autocast(device, bf16):
            hyps = beam_search(model, src.to(device), beam=4, alpha=0.6, max_len_a=1.0, max_len_b=0)
        out_tokens += sum(len(h[0].tokens) for h in hyps)
        done += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "check": "beam_decode",
        "passed": done == len(data),
        "measured": f"{done / seconds:,.1f} sentences/s ({out_tokens / seconds:,.0f} tokens/s)",
        "sentences_per_s": done / seconds,
        "criterion": f"{done} sentences, beam 4, output capped at the source length (random weights)",
    }


def word_corpus(split: str, vocab: dict[str, int]) -> PackedCorpus:
    """corpus/sample-en-de as word ids (lower-cased, punctuation split off), En -> De."""
    pairs = []
    for line in (REPO / "corpus" / "sample-en-de" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        sides = [row[lang].lower().replace(".", " .").replace(",", " ,").split() for lang in ("en", "de")]
        pairs.append(tuple([vocab.setdefault(w, len(vocab)) for w in words] + [EOS_ID] for words in sides))
    return PackedCorpus.from_pairs(pairs)


def check_learns(size: dict, device: torch.device) -> dict:
    """100 updates of the real Trainer on the embedded corpus, word-level vocabulary: the loss must fall."""
    vocab = {"<pad>": PAD_ID, "<unk>": 1, "<s>": BOS_ID, "</s>": EOS_ID}
    train, valid = word_corpus("train", vocab), word_corpus("validation", vocab)
    cfg = make_config(vocab_size=len(vocab), **size["learn_model"])
    training = TrainingConfig(
        update_tokens=size["learn_tokens"], max_tokens=size["learn_tokens"], max_updates=100, warmup=20, lr_factor=2.0,
        validate_every_updates=100,
        log_every_updates=10**9, checkpoint_every_minutes=None, seed=1,
        precision="bf16" if device.type == "cuda" else "float32",
    )  # fmt: skip
    trainer = Trainer(cfg, training, train, valid, device)
    trainer.checkpoint = lambda hooks: None
    timer = Timer(device)
    trainer.fit(timer)
    losses = [s.loss for s in timer.steps]
    last = sum(losses[-10:]) / 10
    valid_loss = trainer.history["valid"][-1]["valid_loss"]
    return {
        "check": "learns",
        "passed": len(losses) == 100 and max(last, valid_loss) < 0.75 * losses[0],
        "measured": f"loss {losses[0]:.2f} -> {last:.2f} (last 10), valid {valid_loss:.2f}, vocab {len(vocab)}",
        "first_loss": losses[0],
        "last10_loss": last,
        "valid_loss": valid_loss,
        "criterion": "last 10 updates and validation below 3/4 of the first update's loss",
    }


def run_checks(size: dict, device: torch.device) -> list[dict]:
    """Every check in turn; the Trainer's progress lines go to a buffer (the table says what matters)."""
    bf16_peak = device.type == "cuda"
    peak = matmul_peak_flops(device.type, torch.bfloat16 if bf16_peak else torch.float32, n=size["peak_n"])
    checks = [functools.partial(check_train, p, size, device, peak) for p in size["presets"]]
    checks += [
        functools.partial(check_cache, size, device, bf16=False),
        functools.partial(check_cache, size, device, bf16=True),
    ]
    checks += [functools.partial(f, size, device) for f in (check_loss_grad, check_beam, check_learns)]
    rows = []
    for check in checks:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rows.append(check())
        rows[-1] |= {"peak_flops": peak, "seconds": round(time.perf_counter() - start, 1)}
        print(
            f"{rows[-1]['check']}: {'passed' if rows[-1]['passed'] else 'FAILED'} ({rows[-1]['seconds']} s)", flush=True
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models and budgets (CPU: under a minute)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("tools/gpu_check.py: no CUDA GPU visible to torch; use --device cpu --tiny to run it on a CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in the fp32 checks
    size = TINY if args.tiny else FULL
    start = time.perf_counter()
    rows = run_checks(size, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak_dtype = "bf16" if device.type == "cuda" else "float32"
    print(f"{name}, torch {torch.__version__}, {'tiny' if args.tiny else 'full'} sizes, "
          f"measured {peak_dtype} matmul peak {rows[0]['peak_flops'] / 1e12:.2f} TFLOP/s, "
          f"{time.perf_counter() - start:.0f} s\n")  # fmt: skip
    print("| check | passed | measured | criterion |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {'yes' if r['passed'] else 'NO'} | {r['measured']} | {r['criterion']} |")
    result = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "seconds": time.perf_counter() - start}
    if args.out:
        args.out.write_text(json.dumps(result | {"checks": rows}, indent=2) + "\n", encoding="utf-8")
    sys.exit(0 if all(r["passed"] for r in rows) else 1)


if __name__ == "__main__":
    main()
