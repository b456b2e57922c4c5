"""Serving capacity: the most streams a StreamEngine can step within the 80 ms real-time budget
at p99, per mode (full / encode / decode) and dtype, plus the step-time-vs-batch curve.

Every tick submits one chunk (1280 samples or 4 tokens) to each open stream (one
submit_batch), then times engine.step_batch() (copy in + one batched chunk step + the outputs
and the flag read-back: one host sync), what a server calls; --api step times the per-stream
dict API instead (a StreamOutput per stream: ~0.5 us each on the host).
The curve runs the bucket sizes of one engine (1, 2, 4, ..., max); the capacity is then
bisected between the last passing and first failing size with engines whose top bucket is
exactly the probed size. Appends JSON lines to bench/results/serve_capacity.jsonl.

    python bench/serve_capacity.py                          # GPU: up to 256 streams
    python bench/serve_capacity.py --quick --threads 1      # CPU: a few minutes
    python bench/serve_capacity.py --dtypes bfloat16 --probe full:6000 encode:8000 decode:25000
                                        # GPU: pass/fail at the issue-11 targets, no curve
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

import fastfocal
from fastfocal.engine import StreamEngine
from fastfocal.graphs import buckets_for

sys.path.insert(0, str(Path(__file__).parent))
from stream_latency import RESULTS, machine, pct  # noqa: E402


def inputs(codec, mode: str, k: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if mode == "decode":
        return [torch.randint(0, codec.codebook_size, (4,), generator=g) for _ in range(k)]
    return [torch.randn(codec.chunk_size, generator=g) * 0.1 for _ in range(k)]


def step_times(engine: StreamEngine, n: int, xs, reps: int, warmup: int, api: str = "step_batch"
               ) -> tuple[list[float], float]:
    """Per-step seconds with n streams open (opened here, closed after); mean submit seconds."""
    ids = [engine.open() for _ in range(n)]
    blocks = [torch.stack([xs[(i + j) % len(xs)] for j in range(n)]).numpy() for i in range(len(xs))]
    step = getattr(engine, api)
    out, sub = [], 0.0
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        engine.submit_batch(ids, blocks[i % len(blocks)])
        t1 = time.perf_counter()
        res = step()
        t2 = time.perf_counter()
        assert len(res) == n
        if i >= warmup:
            out.append(t2 - t1)
            sub += t1 - t0
    for s in ids:
        engine.close(s)
    return out, sub / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="50hz_4k_causal")
    ap.add_argument("--quick", action="store_true", help="smaller sweep (CPU-sized)")
    ap.add_argument("--modes", nargs="+", default=["full", "encode", "decode"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--max-streams", type=int, help="largest batch tried (GPU 256, CPU 8, quick 4)")
    ap.add_argument("--budget-ms", type=float, default=80.0)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-refine", action="store_true", help="report the largest passing bucket only")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    ap.add_argument("--api", default="step_batch", choices=["step_batch", "step"])
    ap.add_argument("--probe", nargs="+", metavar="MODE:N",
                    help="only time these sizes (one engine each, top bucket exactly N): pass/fail at p99")
    ap.add_argument("--out", default=str(RESULTS / "serve_capacity.jsonl"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    max_n = args.max_streams or (256 if gpu else (4 if args.quick else 8))
    reps = args.reps or (100 if gpu else (5 if args.quick else 10))
    graphs = gpu and not args.no_graphs
    budget = args.budget_ms / 1e3
    info = machine()
    print(f"{info['machine']}, torch {info['torch']}, {info['threads']} threads, commit {info['commit']}; "
          f"budget {args.budget_ms} ms at p99, {reps} steps per point, graphs {graphs}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def keep(r):  # each row as it comes: a run cut short by a time limit keeps what it measured
        rows.append(r)
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")

    base = {"bench": "serve_capacity", **info, "command": " ".join(["python"] + sys.argv),
            "model": f"random:{args.preset}", "graphs": graphs, "budget_ms": args.budget_ms, "api": args.api}

    def point(engine, mode, dtype, n, kind):
        ts, sub = step_times(engine, n, xs, reps, args.warmup, args.api)
        r = {**base, "kind": kind, "dtype": dtype, "mode": mode, "batch": n, "steps": reps,
             "p50_ms": pct(ts, 0.5) * 1e3, "p99_ms": pct(ts, 0.99) * 1e3, "per_stream_ms": pct(ts, 0.5) * 1e3 / n,
             "submit_ms": sub * 1e3, "audio_s_per_s": n * 0.08 / pct(ts, 0.5)}
        keep(r)
        print(f"  {mode:6s} {dtype:8s} batch {n:4d}: p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
              f"{r['per_stream_ms']:7.2f} ms/stream  {r['audio_s_per_s']:7.1f} audio-s/s  submit {r['submit_ms']:.2f} ms")
        return r["p99_ms"] / 1e3 <= budget

    probes = [(m, int(n)) for m, n in (p.split(":") for p in args.probe)] if args.probe else None
    for dtype in args.dtypes:
        codec = fastfocal.random_init(args.preset, seed=0, dtype=dtype)
        for mode, n in probes or []:
            xs = inputs(codec, mode)
            engine = None
            try:
                engine = StreamEngine(codec, n, mode=mode, cuda_graphs=graphs)
                ok = point(engine, mode, dtype, n, "target")
            except (MemoryError, RuntimeError, fastfocal.InputError) as e:  # does not fit: a result too; the next probe runs
                keep({**base, "kind": "target", "dtype": dtype, "mode": mode, "batch": n, "error": str(e)[:300]})
                print(f"{mode:6s} {dtype:8s}: {n} streams FAIL ({type(e).__name__}: {str(e)[:120]})")
                continue
            finally:
                del engine
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
            print(f"{mode:6s} {dtype:8s}: {n} streams {'PASS' if ok else 'FAIL'} ({args.budget_ms:.0f} ms at p99)")
        for mode in ([] if probes else args.modes):
            xs = inputs(codec, mode)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            engine = StreamEngine(codec, max_n, mode=mode, cuda_graphs=graphs)
            ok = {n: point(engine, mode, dtype, n, "curve") for n in buckets_for(max_n)}
            peak = torch.cuda.max_memory_allocated() if gpu else None
            del engine
            gc.collect()
            good = [n for n, v in ok.items() if v]
            lo = max(good, default=0)
            hi = min((n for n, v in ok.items() if not v and n > lo), default=None)
            while not args.no_refine and hi is not None and hi - lo > 1:  # bisect with exact top buckets
                mid = (lo + hi) // 2
                e = StreamEngine(codec, mid, mode=mode, cuda_graphs=graphs)
                lo, hi = (mid, hi) if point(e, mode, dtype, mid, "probe") else (lo, mid)
                del e
                gc.collect()
            cap = {**base, "kind": "capacity", "dtype": dtype, "mode": mode, "capacity": lo,
                   "capacity_is_lower_bound": hi is None, "max_tried": max_n,
                   "state_bytes_per_stream": StreamEngine.bytes_per_stream(codec, mode),
                   "peak_mem_bytes": peak}
            keep(cap)
            print(f"{mode:6s} {dtype:8s}: capacity {'>=' if hi is None else ''}{lo} streams under "
                  f"{args.budget_ms:.0f} ms p99; state {cap['state_bytes_per_stream'] / 2**20:.1f} MiB/stream"
                  + (f"; peak GPU memory {peak / 2**30:.1f} GiB at {max_n} slots" if peak else ""))
        del codec
        gc.collect()
    print(f"appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
