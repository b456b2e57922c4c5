"""End-to-end benchmark: offline encode/decode throughput and single-stream step latency.

One run measures, on whatever device is present, the default backend (Triton kernels on CUDA,
the CPU forms and prepacked oneDNN matmuls on CPU) and the PyTorch reference backend as
baseline, for float32 and bfloat16 (add float16 with --dtypes on a GPU), and writes
bench/results/e2e-<machine>.{json,md,png}.

    python bench/e2e.py                 # full sweep (GPU: batch 1..64, 30 s clips)
    python bench/e2e.py --quick         # CPU-sized sweep, a few minutes on 2 cores
    python bench/e2e.py --quick --batches 1 --tag cpu-avx2   # results as e2e-cpu-avx2.*
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastfocal
from fastfocal import ops

LARGE_GEMM = ops.LARGE_GEMM

RESULTS = Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or Path(__file__).parent / "results")  # tests point it at a tmp dir


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), so rows from different 2-core machines stay apart."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name} x{os.cpu_count()}"


def machine() -> dict:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    return {"device": dev, "torch": torch.__version__, "commit": commit, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_isa": cpu_isa()}


def cpu_isa() -> str:
    """The vector extensions CPU bf16 speed hangs on (oneDNN packs bf16 only with AVX-512 or
    AVX-NE-CONVERT; AMX multiplies it)."""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    want = ("avx2", "avx512bw", "avx512_bf16", "avx_ne_convert", "amx_bf16")
    return " ".join(f for f in want if f in flags) or "none of " + " ".join(want)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = args.backends
    rows = []
    # float32 once per --f32-dots mode (split tensor-core dots; rows say "float32-<mode>")
    # (no --f32-dots: FASTFOCAL_F32_DOT's mode)
    runs = [(d, m) for d in args.dtypes for m in (args.f32_dots or [None] if d in ("float32", "fp32") else [None])]
    for i, (dtype, mode) in enumerate(runs):
        if i == 0 or runs[i - 1][0] != dtype:
            codec = fastfocal.random_init(args.preset, seed=0, device=device, dtype=dtype)
        fastfocal.set_f32_dot(mode)
        mode = fastfocal.f32_dot()
        label = dtype if mode == "ieee" or dtype not in ("float32", "fp32") else f"{dtype}-{mode}"
        g = torch.Generator().manual_seed(0)
        for backend in backends:
            # "gemm": the default backend with ops.LARGE_GEMM (the matmul kernel's GEMM tiles)
            os.environ["FASTFOCAL_BACKEND"] = "auto" if backend == "gemm" else backend
            ops.LARGE_GEMM = LARGE_GEMM or backend == "gemm"
            n = int(args.seconds * 16000)
            for b in args.batches:
                sig = (torch.randn(b, n, generator=g) * 0.1).to(device)
                ts = timeit(lambda: codec.sig_to_toks(sig), args.reps)
                toks = codec.sig_to_toks(sig)
                td = timeit(lambda: codec.toks_to_sig(toks), args.reps)
                audio = b * args.seconds
                for what, t in (("encode", ts), ("decode", td)):
                    rows.append({"bench": what, "dtype": label, "backend": backend, "batch": b, "seconds": args.seconds,
                                 "median_s": statistics.median(t), "audio_s_per_s": audio / statistics.median(t)})
                    print(f"{what:7s} {label:8s} {backend:6s} batch {b:3d}: {audio / statistics.median(t):9.1f} audio-s/s")
            s = codec.stream(batch_size=1)
            x = (torch.randn(1, codec.chunk_size, generator=g) * 0.1).to(device)
            lat = timeit(lambda: s.push(x), args.steps, warmup=5)
            lat.sort()
            p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3  # noqa: E731
            rows.append({"bench": "stream_step", "dtype": label, "backend": backend, "batch": 1,
                         "p50_ms": p(0.5), "p99_ms": p(0.99), "steps": len(lat)})
            print(f"step    {label:8s} {backend:6s} batch   1: p50 {p(0.5):.2f} ms  p99 {p(0.99):.2f} ms")
        if i + 1 == len(runs) or runs[i + 1][0] != dtype:
            del codec
    os.environ.pop("FASTFOCAL_BACKEND", None)
    ops.LARGE_GEMM = LARGE_GEMM
    fastfocal.set_f32_dot(None)
    return rows


def write(rows: list[dict], info: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("gpu-" + info["device"].replace(" ", "_") if torch.cuda.is_available() else "cpu")
    (RESULTS / f"e2e-{tag}.json").write_text(json.dumps({"machine": info, "command": " ".join(sys.argv), "rows": rows}, indent=1))
    lines = [f"Machine: {info['device']} ({info['cpu_isa']}), torch {info['torch']}, commit {info['commit']}, {info['date']}",
             f"Command: `python {' '.join(sys.argv)}` (model: random-init {args.preset})", "",
             "| bench | dtype | backend | batch | result |", "|---|---|---|---|---|"]
    for r in rows:
        res = (f"{r['audio_s_per_s']:.1f} audio-s/s ({r['seconds']} s clips)" if "audio_s_per_s" in r
               else f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms per 80 ms chunk")
        lines.append(f"| {r['bench']} | {r['dtype']} | {r['backend']} | {r['batch']} | {res} |")
    (RESULTS / f"e2e-{tag}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for bench in ("encode", "decode"):
        for dtype in args.dtypes:
            for backend in sorted({r["backend"] for r in rows}):
                pts = [(r["batch"], r["audio_s_per_s"]) for r in rows
                       if r["bench"] == bench and r["dtype"] == dtype and r["backend"] == backend]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{bench} {dtype} {backend}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("audio seconds per second")
    ax.set_title(f"fastfocal offline throughput, {info['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"e2e-{tag}.png", dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="50hz_4k_causal")
    ap.add_argument("--quick", action="store_true", help="CPU-sized sweep")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--backends", nargs="+", default=["auto", "torch"], choices=["auto", "torch", "gemm", "triton"],
                    help="gemm: auto with FASTFOCAL_LARGE_GEMM=1")
    ap.add_argument("--f32-dots", nargs="+", default=None, choices=list(fastfocal.F32_DOTS),
                    help="float32 runs once per mode: ieee (exact) or split tensor-core dots (GPU only; CPU ignores "
                         "it); default: FASTFOCAL_F32_DOT's mode")
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--tag", help="results file tag (default: cpu, or gpu-<device>)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        print("no GPU found: measuring the CPU")
    args.batches = args.batches or ([1, 4] if args.quick else ([1, 4, 16, 64] if gpu else [1, 4, 8]))
    args.seconds = args.seconds or (10.0 if (args.quick or not gpu) else 30.0)
    args.steps = args.steps or (50 if args.quick else 200)
    info = machine()
    rows = run(args)
    write(rows, info, args)
    print(f"wrote {RESULTS}/e2e-*.{{json,md,png}}")


if __name__ == "__main__":
    main()
