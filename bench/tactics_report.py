"""What start-up tactic choice measured: for each batch bucket of an engine, the graph replay
time of every tactic the runner timed (fastfocal.tactics), the default's, and the one it kept.
Every switch's A/B (PDL, GEMM tiles for many rows, the focal many-row form, the attention key
block) at every bucket, in the real captured step, in one engine build. CUDA only.
Appends rows to bench/results/tactics.jsonl.

    python bench/tactics_report.py --mode full --dtype bfloat16 --max-streams 1024
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fastfocal  # noqa: E402
from fastfocal import tactics  # noqa: E402
from stream_latency import machine  # noqa: E402

RESULTS = Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or Path(__file__).parent / "results")  # tests point it at a tmp dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="50hz_4k_causal")
    ap.add_argument("--mode", default="full", choices=["full", "encode", "decode"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-streams", type=int, default=1024)
    ap.add_argument("--out", default=str(RESULTS / "tactics.jsonl"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tactics_report: needs CUDA (the runner times captured graphs)")
    if not tactics.enabled():
        sys.exit("tactics_report: FASTFOCAL_TUNE=0 is set")
    # each bucket's result as the build goes (largest first), so a run cut short still shows them
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    codec = fastfocal.random_init(args.preset, seed=0, dtype=args.dtype)
    t0 = time.perf_counter()
    engine = fastfocal.StreamEngine(codec, args.max_streams, mode=args.mode)
    build_s = time.perf_counter() - t0
    info = machine()
    base = {"bench": "tactics", **info, "command": " ".join(["python"] + sys.argv), "model": f"random:{args.preset}",
            "mode": args.mode, "dtype": args.dtype, "build_s": round(build_s, 1)}
    print(f"{info['machine']}, commit {info['commit']}: {args.mode} {args.dtype} engine of {args.max_streams} "
          f"streams built in {build_s:.1f} s (compiles and captures included)\n")
    print("| rows | default ms | kept | ms | gain | every tactic timed (ms) |\n|---|---|---|---|---|---|")
    timings = engine.runner.timings
    with Path(args.out).open("a") as f:
        for b in sorted(timings):
            times, kept = timings[b], engine.tactics[b]
            default = next(iter(times))  # the first timed: the defaults
            t_def, t_kept = times[default], times[tactics.key(kept)]
            others = ", ".join(f"{dict(k)}: {v:.3f}" for k, v in times.items())
            print(f"| {b} | {t_def:.3f} | {kept} | {t_kept:.3f} | {t_def / t_kept:.2f}x | {others} |")
            f.write(json.dumps({**base, "batch": b, "default": dict(default), "default_ms": t_def, "kept": kept,
                                "kept_ms": t_kept, "timed": [{"tactic": dict(k), "ms": v} for k, v in times.items()]}) + "\n")
    print(f"\nappended {len(timings)} rows to {args.out}")


if __name__ == "__main__":
    main()
