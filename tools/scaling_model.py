"""Expected data-parallel throughput, time and cost for WMT14 base/big: a model on paper, not a measurement.

    python -m tools.scaling_model            # the tables in bench/README.md and the README
    python -m tools.scaling_model --a100-vs-p100 4 --overlap 0.3   # any assumption can be changed

Every number comes from the assumptions below (printed with the tables). The peer is the paper (Vaswani et al.
2017, §5.2): 8 P100, base 0.4 s/step x 100k steps = 12 h, big 1.0 s/step x 300k steps = 3.5 days.

Model of one update (DDP, ring all-reduce, global batch of `update_tokens` target tokens):
  compute(N)  = max(update_time_1gpu / N, floor)        update_time_1gpu = 8 x paper step time / speedup
  allreduce   = 2 (N-1)/N x gradient_bytes / busbw      busbw = intra-node if N <= 8, else min(intra, inter)
  hidden      = overlap x backward share x compute of the last micro-batch (the all-reduce runs once per
                update, during the last backward: earlier micro-batches run under no_sync)
  step        = compute + max(0, allreduce - hidden)
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

PAPER = {"base": (0.4, 100_000), "big": (1.0, 300_000)}  # s/step on 8 P100, steps (§5.2)
PARAMS = {"base": 65e6, "big": 213e6}  # Table 3
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Hardware:
    name: str
    speedup_vs_p100: float  # per-GPU throughput on this model, bf16 autocast vs the paper's fp32 P100
    intra_busbw: float  # GB/s, NCCL all-reduce bus bandwidth inside a node (NVLink/NVSwitch)
    inter_busbw: float  # GB/s, per node across nodes
    price_per_node_hour: float  # USD, 8-GPU instance, on-demand
    network: str


def hardware(args) -> list[Hardware]:
    a100, h100 = args.a100_vs_p100, args.a100_vs_p100 * args.h100_vs_a100
    eff = args.link_efficiency
    return [
        Hardware("p4d A100, EFA", a100, 300 * eff, 400 / 8 * eff, args.p4d_price, "EFA 400 Gbps"),
        Hardware("p4d A100, TCP", a100, 300 * eff, args.tcp_gbps / 8 * eff, args.p4d_price, "TCP/ENA, no EFA"),
        Hardware("p5 H100, EFA", h100, 450 * eff, 3200 / 8 * eff, args.p5_price, "EFA 3200 Gbps"),
    ]


def update_time(model: str, gpus: int, hw: Hardware, args) -> dict:
    paper_step, _ = PAPER[model]
    one_gpu = GPUS_PER_NODE * paper_step / hw.speedup_vs_p100  # one GPU doing the whole 25k-token update
    compute = max(one_gpu / gpus, args.floor)
    micro_batches = math.ceil(args.update_tokens / (gpus * args.max_tokens))
    grad_bytes = PARAMS[model] * args.grad_bytes
    busbw = hw.intra_busbw if gpus <= GPUS_PER_NODE else min(hw.intra_busbw, hw.inter_busbw)
    allreduce = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * grad_bytes / (busbw * 1e9)
    hidden = args.overlap * args.backward_share * compute / micro_batches
    step = compute + max(0.0, allreduce - hidden)
    return {
        "compute": compute,
        "allreduce": allreduce,
        "step": step,
        "tokens_per_gpu": args.update_tokens / gpus,
    }


def scaling_rows(args) -> list[str]:
    rows = [
        "| model | hardware | GPUs | tokens/GPU/update | compute s | all-reduce s | step s "
        "| target tok/s | speed-up | efficiency |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in PAPER:
        for hw in hardware(args):
            base = update_time(model, 1, hw, args)["step"]
            for gpus in (1, 8, 64):
                t = update_time(model, gpus, hw, args)
                speedup = base / t["step"]
                rows.append(
                    f"| {model} | {hw.name} | {gpus} | {t['tokens_per_gpu']:,.0f} | {t['compute']:.3f} "
                    f"| {t['allreduce'] * 1e3:.1f} ms | {t['step']:.3f} "
                    f"| {args.update_tokens / t['step']:,.0f} "
                    f"| {speedup:.1f}x | {speedup / gpus:.0%} |"
                )
    return rows


def cost_rows(args) -> list[str]:
    rows = [
        "| model | hardware | GPUs | steps | step s | training h | vs paper | GPU cost USD | total USD |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, (paper_step, steps) in PAPER.items():
        for hw in hardware(args)[::2]:  # one 8-GPU node: the network does not matter
            t = update_time(model, GPUS_PER_NODE, hw, args)
            hours = steps * t["step"] / 3600
            gpu_cost = (hours + args.node_overhead_h) * hw.price_per_node_hour
            head = (hours + args.node_overhead_h + args.data_stages_h) * args.head_price
            rows.append(
                f"| {model} | {hw.name.split(',')[0]} | 8 | {steps:,} | {t['step']:.3f} | {hours:.1f} "
                f"| {paper_step / t['step']:.1f}x faster | {gpu_cost:,.0f} | {gpu_cost + head:,.0f} |"
            )
    return rows


def assumptions(args) -> list[str]:
    mb = {m: PARAMS[m] * args.grad_bytes / 1e6 for m in PARAMS}
    return [
        f"- Per-GPU speed on this model vs the paper's P100: A100 {args.a100_vs_p100}x, "
        f"H100 {args.h100_vs_a100}x an A100 (bf16 autocast; assumed, not measured).",
        f"- Global batch {args.update_tokens:,} target tokens per update at every GPU count (the paper's); "
        f"at most {args.max_tokens:,} tokens per forward pass "
        "(params `train.update_tokens`, `train.max_tokens`).",
        f"- Gradients all-reduced in fp32 ({args.grad_bytes:g} bytes/param: DDP reduces the fp32 .grad "
        f"of fp32 parameters under bf16 autocast): base 65M params = {mb['base']:.0f} MB, "
        f"big 213M = {mb['big']:.0f} MB per update.",
        f"- NCCL reaches {args.link_efficiency:.0%} of link bandwidth: NVLink A100 300 GB/s and "
        "H100 450 GB/s per direction; per node p4d 400 Gbps EFA, p5 3200 Gbps EFA, "
        f"{args.tcp_gbps:g} Gbps TCP without EFA (cluster.yaml as shipped: see the EFA note in the README).",
        f"- Overlap: {args.overlap:.0%} of the last backward pass ({args.backward_share:.0%} of compute) "
        f"hides the all-reduce. Compute floor {args.floor * 1e3:.0f} ms per update: at 64 GPUs each GPU "
        "sees ~390 tokens and is latency-bound, so a real 64-GPU run would use a larger batch "
        "(Ott et al. 2018).",
        f"- On-demand prices (us-east-1/us-west-2, assumed; check current pricing): p4d.24xlarge "
        f"${args.p4d_price}/h, p5.48xlarge ${args.p5_price}/h, head m6i.4xlarge ${args.head_price}/h. "
        f"+{args.node_overhead_h} h per GPU node for boot and setup; the head also runs the data stages "
        f"(~{args.data_stages_h} h) before any GPU node starts.",
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a100-vs-p100", type=float, default=5.0)
    p.add_argument("--h100-vs-a100", type=float, default=1.8)
    p.add_argument("--update-tokens", type=int, default=25_000)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--grad-bytes", type=float, default=4.0, help="4: fp32 gradients, 2: bf16 comm hook")
    p.add_argument("--link-efficiency", type=float, default=0.8)
    p.add_argument("--tcp-gbps", type=float, default=25.0)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--backward-share", type=float, default=2 / 3)
    p.add_argument("--floor", type=float, default=0.03, help="seconds: smallest update time of one GPU")
    p.add_argument("--p4d-price", type=float, default=21.96)
    p.add_argument("--p5-price", type=float, default=55.04)
    p.add_argument("--head-price", type=float, default=0.768)
    p.add_argument("--node-overhead-h", type=float, default=0.25)
    # The data stages measured 3.5 min on 2 cores at WMT14 size (bench/README.md), plus the hub download (unmeasured)
    p.add_argument("--data-stages-h", type=float, default=0.25)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    print("Assumptions (estimates, not measurements):\n" + "\n".join(assumptions(args)))
    print("\nScaling (throughput per update; speed-up and efficiency vs 1 GPU of the same kind):\n")
    print("\n".join(scaling_rows(args)))
    print("\nTime and cost on one 8-GPU node (the paper's setting), vs the paper's 8 P100:\n")
    print("\n".join(cost_rows(args)))


if __name__ == "__main__":
    main()
