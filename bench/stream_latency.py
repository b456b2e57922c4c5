"""Batch-1 streaming latency: wall time per 80 ms chunk (push of 1280 samples or 4 tokens to a
batch-1 session, synchronised), p50/p90/p99 after warm-up; eager vs CUDA graphs; fp32/bf16.

Appends one JSON line per configuration to bench/results/stream_latency.jsonl.

    python bench/stream_latency.py                    # GPU: full/encode/decode x fp32/bf16 x eager/graphs
    python bench/stream_latency.py --quick --threads 1  # CPU: a few minutes
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastfocal
from fastfocal import ops
from fastfocal.streaming import Stream, StreamDecoder, StreamEncoder

RESULTS = Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or Path(__file__).parent / "results")  # tests point it at a tmp dir
PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12}  # bytes/s, HBM/GDDR


def machine() -> dict:
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    else:
        from e2e import cpu_name  # bench/ is on sys.path when run as a script

        dev = cpu_name()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "?"
    except OSError:
        commit = "?"
    return {"machine": dev, "commit": commit, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_1m": round(os.getloadavg()[0], 2),  # >cores: noisy
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FASTFOCAL_")}}  # the A/B knobs


def peak_bw(dev: str) -> float | None:
    return next((v for k, v in PEAK_BW.items() if k in dev), None)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def weight_bytes(codec, mode: str) -> int:
    """Bytes of the weights one chunk step reads (each weight once: the floor on memory traffic)."""
    m = codec.model
    parts = {"full": (m.encoder, m.compressor, m.decompressor, m.decoder), "encode": (m.encoder, m.compressor),
             "decode": (m.decompressor, m.decoder)}[mode]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def session(codec, mode: str, graphs: bool):
    cls = {"full": Stream, "encode": StreamEncoder, "decode": StreamDecoder}[mode]
    return cls(codec, 1, cuda_graphs=graphs)


def measure(codec, mode: str, graphs: bool, steps: int, warmup: int) -> list[float]:
    s = session(codec, mode, graphs)
    g = torch.Generator().manual_seed(0)
    if mode == "decode":
        xs = [torch.randint(0, codec.codebook_size, (1, 4), generator=g).to(codec.device) for _ in range(16)]
    else:
        xs = [(torch.randn(1, codec.chunk_size, generator=g) * 0.1).to(codec.device, codec.dtype) for _ in range(16)]
    out = []
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        s.push(xs[i % len(xs)])
        sync()
        if i >= warmup:
            out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="50hz_4k_causal")
    ap.add_argument("--quick", action="store_true", help="fewer steps (CPU-sized)")
    ap.add_argument("--modes", nargs="+", default=["full", "encode", "decode"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    ap.add_argument("--out", default=str(RESULTS / "stream_latency.jsonl"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    steps = args.steps or (20 if args.quick else (300 if gpu else 50))
    info = machine()
    bw = peak_bw(info["machine"]) if gpu else None
    print(f"{info['machine']}, torch {info['torch']}, {info['threads']} threads, commit {info['commit']}; "
          f"batch-1 chunk latency, {steps} steps after {args.warmup} warm-up")
    rows = []
    for dtype in args.dtypes:
        codec = fastfocal.random_init(args.preset, seed=0, dtype=dtype)
        for mode in args.modes:
            wb = weight_bytes(codec, mode)
            base = None
            for graphs in ([False, True] if gpu else [False]):
                lat = measure(codec, mode, graphs, steps, args.warmup)
                p50 = pct(lat, 0.5)
                base = base or p50
                row = {"bench": "stream_latency", **info, "command": " ".join(["python"] + sys.argv),
                       "model": f"random:{args.preset}", "device": str(codec.device), "dtype": dtype, "mode": mode,
                       "graphs": graphs, "batch": 1, "steps": steps,
                       "skinny_rows": ops.SKINNY_ROWS,  # 0: cuBLAS + separate epilogues/norms
                       "p50_ms": p50 * 1e3, "p90_ms": pct(lat, 0.9) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
                       "mean_ms": sum(lat) / len(lat) * 1e3, "speedup_vs_eager": base / p50,
                       "realtime_factor": 0.08 / p50, "weight_bytes": wb, "weight_gb_per_s": wb / p50 / 1e9,
                       "frac_peak_bw": (wb / p50 / bw) if bw else None}
                rows.append(row)
                print(f"{dtype:8s} {mode:6s} {'graphs' if graphs else 'eager':6s}: p50 {row['p50_ms']:8.2f} ms  "
                      f"p90 {row['p90_ms']:8.2f}  p99 {row['p99_ms']:8.2f}  x{row['speedup_vs_eager']:.2f} vs eager  "
                      f"{row['realtime_factor']:.2f}x real time  weights {row['weight_gb_per_s']:.1f} GB/s"
                      + (f" ({row['frac_peak_bw']:.0%} of peak)" if bw else ""))
        del codec
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
