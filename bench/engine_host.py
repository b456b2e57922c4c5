"""Host work of one StreamEngine step: everything `step()` / `step_batch()` does besides the
pipeline step itself (gathering pending input, slot bookkeeping, outputs), and `submit` cost.

The pipeline step is timed separately (synchronised) and subtracted, so the number is the
host overhead whatever the device. Target (issue 11): <= 1 ms per step at 4,096 streams.
Appends rows to bench/results/engine_host.jsonl.

    python bench/engine_host.py                                   # tiny model, CPU, 256..4096 streams
    python bench/engine_host.py --random-init 50hz_4k_causal --device cuda --dtype bf16
    python bench/engine_host.py --host-only --streams 4096       # the device step replaced by its
                                        # output, computed once: host work alone, no cache eviction
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fastfocal  # noqa: E402
from stream_latency import machine, sync  # noqa: E402

RESULTS = Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or Path(__file__).parent / "results")  # tests point it at a tmp dir


def measure(engine, steps: int, batch: bool, batch_submit: bool = False, host_only: bool = False) -> dict:
    rng = np.random.default_rng(0)
    ids = [engine.open() for _ in range(engine.max_streams)]
    unit = engine.chunk
    data = (rng.standard_normal(unit * 3) * 0.1).astype(np.float32) if engine.mode != "decode" else \
        rng.integers(0, engine.codec.codebook_size, unit * 3)
    pieces = [np.tile(data[: unit // 3], (len(ids), 1)), np.tile(data[unit // 3: unit], (len(ids), 1))]
    run = engine.runner.run
    inner: list[float] = []

    canned = []

    def timed_run(*a, **k):  # the device step, synchronised, so the rest is host work
        sync()
        t0 = time.perf_counter()
        if host_only and canned:  # the first step's outputs again: on a CPU the model's step
            out = canned[0]       # evicts the caches the host work then runs in
        else:
            out = run(*a, **k)
            canned.append(out)
        sync()
        inner.append(time.perf_counter() - t0)
        return out

    engine.runner.run = timed_run
    pauses: list[float] = []  # the cyclic GC's full collections during the measured steps

    def on_gc(phase, info):
        if phase == "start":
            on_gc.t0 = time.perf_counter()
        elif info["generation"] == 2 and measuring:
            pauses.append(time.perf_counter() - on_gc.t0)

    gc.callbacks.append(on_gc)
    measuring = False
    sub, tot = [], []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        if batch_submit:  # the same two pieces for every stream, one call each
            engine.submit_batch(ids, pieces[0])
            engine.submit_batch(ids, pieces[1])
        else:
            for sid in ids:  # one chunk per stream per step, in two uneven pieces
                engine.submit(sid, data[: unit // 3])
                engine.submit(sid, data[unit // 3: unit])
        t1 = time.perf_counter()
        out = engine.step_batch() if batch else engine.step()
        sync()
        t2 = time.perf_counter()
        assert len(out) == len(ids)
        if i >= 2:  # warm-up
            sub.append(t1 - t0)
            tot.append(t2 - t1)
        measuring = i >= 1
    engine.runner.run = run
    gc.callbacks.remove(on_gc)
    host = [t - d for t, d in zip(tot, inner[2:])]
    return {"step_ms": 1e3 * statistics.median(tot), "device_ms": 1e3 * statistics.median(inner[2:]),
            "host_ms": 1e3 * statistics.median(host), "host_p90_ms": 1e3 * float(np.percentile(host, 90)),
            "submit_ms_all_streams": 1e3 * statistics.median(sub), "gc_full_collections": len(pauses),
            "gc_full_max_ms": 1e3 * max(pauses, default=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).parent.parent / "tests" / "data" / "tiny_causal"))
    ap.add_argument("--random-init", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--mode", default="decode", choices=["full", "encode", "decode"])
    ap.add_argument("--streams", default="256,1024,4096")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--host-only", action="store_true", help="replay the first step's outputs instead of stepping")
    ap.add_argument("--no-freeze", action="store_true", help="StreamEngine(freeze_gc=False): the GC's full scans stay")
    args = ap.parse_args()
    codec = fastfocal.open_codec(args.model if not args.random_init else None, args.random_init, args.device, args.dtype)
    RESULTS.mkdir(exist_ok=True)
    info = machine()
    print(f"{'streams':>8} {'api':>23} {'step ms':>8} {'device ms':>9} {'host ms':>8} {'host p90':>8} {'submit ms':>9}"
          f" {'full GCs':>8} {'GC max ms':>9}")
    for n in map(int, args.streams.split(",")):
        engine = fastfocal.StreamEngine(codec, n, mode=args.mode, freeze_gc=not args.no_freeze)
        for batch, batch_submit in ((True, True), (True, False), (False, False)):
            r = measure(engine, args.steps, batch, batch_submit, args.host_only)
            for sid in list(engine.streams):
                engine.close(sid)
            api = ("submit_batch+" if batch_submit else "") + ("step_batch" if batch else "step")
            row = {**info, "bench": "engine_host", "model": codec.name, "dtype": args.dtype, "mode": args.mode,
                   "streams": n, "api": api, "freeze_gc": not args.no_freeze,
                   "host_only": args.host_only, **{k: round(v, 3) for k, v in r.items()}}
            with open(RESULTS / "engine_host.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{n:8d} {api:>23} {r['step_ms']:8.2f} {r['device_ms']:9.2f} {r['host_ms']:8.2f} "
                  f"{r['host_p90_ms']:8.2f} {r['submit_ms_all_streams']:9.2f} {r['gc_full_collections']:8d} "
                  f"{r['gc_full_max_ms']:9.1f}")


if __name__ == "__main__":
    main()
