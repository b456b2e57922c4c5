"""Where offline encode/decode time goes: per-kernel device time of one batched call, next to
its FLOP floor. The offline/corpus issue asks to find every cause before changing anything;
this is the one device call that shows them.

For each dtype and direction (encode = sig_to_toks, decode = toks_to_sig) on `--batch` clips of
`--seconds`: the call's time (median of `--reps`, synchronized), audio-s/s, the FLOPs it does
(counted once on the reference ops for one row, times the batch), the share of the dtype's
matrix peak that reaches, how much of the wall time the device is busy, and the top kernels by
device time (CPU: top ops by self time). Appends rows to bench/results/offline_profile.jsonl.

    python bench/offline_profile.py --random-init 50hz_4k_causal --dtypes float32 bfloat16 float16
    python bench/offline_profile.py --model tests/data/tiny_causal --batch 2 --seconds 2   # CPU smoke
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import fastfocal  # noqa: E402
from stream_latency import machine  # noqa: E402

RESULTS = Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or Path(__file__).parent / "results")  # tests point it at a tmp dir
PEAK = {"float32": 67e12, "bfloat16": 790e12, "float16": 790e12}  # H200 dense; fp32 without TF32


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def top_kernels(prof, dev: str, n: int) -> tuple[list[dict], float]:
    """(top n kernels/ops by device (CPU: self) time, their total), in ms."""
    by = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if dev == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        else:
            t = e.self_cpu_time_total
        by[e.name][0] += t / 1e3
        by[e.name][1] += 1
    total = sum(v[0] for v in by.values())
    rows = sorted(({"kernel": k[:80], "ms": round(v[0], 3), "calls": v[1]} for k, v in by.items()),
                  key=lambda r: -r["ms"])
    return rows[:n], total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-init", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    if args.model is None and args.random_init is None:
        args.random_init = "50hz_4k_causal"
    dev = args.device
    info = {**machine(), "bench": "offline_profile", "batch": args.batch, "seconds": args.seconds}
    RESULTS.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    n = int(16000 * args.seconds)
    sig = (torch.randn(args.batch, n, generator=g) * 0.1).to(dev)
    for dtype in args.dtypes:
        codec = fastfocal.open_codec(args.model, args.random_init, dev, dtype)
        toks = codec.sig_to_toks(sig[:1]).repeat(args.batch, 1)
        for what, fn, x in (("encode", codec.sig_to_toks, sig), ("decode", codec.toks_to_sig, toks)):
            os.environ["FASTFOCAL_BACKEND"] = "torch"  # FLOPs of one row on the reference ops (Triton is uncounted)
            with FlopCounterMode(display=False) as fc, torch.inference_mode():
                fn(x[:1])
            os.environ.pop("FASTFOCAL_BACKEND")
            flops = fc.get_total_flops() * args.batch
            fn(x)
            sync(dev)
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn(x)
                sync(dev)
                ts.append(time.perf_counter() - t0)
            wall = statistics.median(ts)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
            with profile(activities=acts) as prof:
                fn(x)
                sync(dev)
            top, busy_ms = top_kernels(prof, dev, args.top)
            row = {**info, "model": codec.name, "dtype": dtype, "what": what, "wall_ms": round(wall * 1e3, 2),
                   "audio_s_per_s": round(args.batch * args.seconds / wall, 1), "gflop": round(flops / 1e9, 1),
                   "tflop_s": round(flops / wall / 1e12, 2), "top": top}
            if dev == "cuda":
                row["peak_share"] = round(flops / wall / PEAK[dtype], 4)
                row["device_busy"] = round(busy_ms / 1e3 / wall, 3)
            with open(RESULTS / "offline_profile.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            extra = (f", {100 * row['peak_share']:.1f}% of the {dtype} peak, device busy "
                     f"{100 * row['device_busy']:.0f}%") if dev == "cuda" else ""
            print(f"\n## {what} {dtype}: batch {args.batch} x {args.seconds:g} s in {wall * 1e3:.1f} ms = "
                  f"{row['audio_s_per_s']:,.0f} audio-s/s; {row['gflop']:,.0f} GFLOP, {row['tflop_s']} TFLOP/s{extra}\n")
            print(f"| {'kernel' if dev == 'cuda' else 'op (self CPU)'} | calls | ms | share |\n|---|---|---|---|")
            for r in top:
                print(f"| {r['kernel']} | {r['calls']} | {r['ms']:.2f} | {100 * r['ms'] / max(busy_ms, 1e-9):.1f}% |")
        del codec
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
