"""Microbenchmarks behind two CPU batch-1 step changes (1 thread, cold cache: a 64 MB buffer is
touched before every call; the variants interleaved in random order, median of --reps):

- WavLM's positional conv at 4 rows (16 groups x 64 outputs x 8192 taps, fp32): one bmm, as
  before, against a oneDNN matmul per group on weights reordered once (`ops.grouped_conv_time_major`);
- the streaming attention scores against a 508-frame K ring (16 heads x 64, 4 queries): q K^T
  against K q^T (`cpu.rel_attention_step`, fp32), and the fp32 weight-read floor of each.

    python bench/cpu_micro.py [--reps 40]
"""
from __future__ import annotations

import argparse
import random
import time

import torch


def timed(fns: dict, reps: int) -> dict:
    flush = torch.empty(64 << 20, dtype=torch.uint8)
    for f in fns.values():
        f()
    ts = {n: [] for n in fns}
    for _ in range(reps):
        order = list(fns)
        random.shuffle(order)
        for n in order:
            flush.add_(1)
            t = time.perf_counter()
            fns[n]()
            ts[n].append(time.perf_counter() - t)
    return {n: sorted(t)[len(t) // 2] * 1e3 for n, t in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=40)
    a = ap.parse_args()
    torch.set_num_threads(1)
    bw = torch.ones(1 << 28)
    bw.sum()
    t = time.perf_counter()
    bw.sum()
    gbps = bw.numel() * 4 / (time.perf_counter() - t) / 1e9

    G, Og, KI, N = 16, 64, 8192, 4
    wg, u = torch.randn(G, Og, KI), torch.randn(G, N, KI)
    packs = [torch.ops.mkldnn._reorder_linear_weight(wg[g].contiguous(), N) for g in range(G)]
    pos = timed({"bmm": lambda: torch.bmm(wg, u.transpose(1, 2)),
                 "packed": lambda: [torch.ops.mkldnn._linear_pointwise(u[g], packs[g], None, "none", [], "")
                                    for g in range(G)]}, a.reps)
    print(f"positional conv, 4 rows: bmm {pos['bmm']:.2f} ms, per-group packed {pos['packed']:.2f} ms, "
          f"floor {wg.numel() * 4 / gbps / 1e6:.2f} ms ({gbps:.1f} GB/s)")

    H, T, R, d = 16, 4, 508, 64
    q, kr = torch.randn(1, H, T, d), torch.randn(1, H, R, d)
    att = timed({"q K^T": lambda: torch.matmul(q, kr.transpose(2, 3)),
                 "K q^T": lambda: torch.matmul(kr, q.transpose(2, 3)).transpose(2, 3)}, a.reps)
    print(f"attention ring scores, fp32: q K^T {att['q K^T'] * 1e3:.0f} us, K q^T {att['K q^T'] * 1e3:.0f} us, "
          f"floor {kr.numel() * 4 / gbps / 1e3:.0f} us")


if __name__ == "__main__":
    main()
