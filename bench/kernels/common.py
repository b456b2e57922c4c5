"""Shared runner for the kernel benchmarks: one op, several implementations, real shapes.

Each bench_<op>.py gives `cases(gpu, quick)` (dicts of sizes) and `make(case, dtype, device)`
returning ({impl: fn}, bytes moved, label). Implementations: "triton" (the kernel, GPU only),
"torch" (the eager reference, the baseline) and "compile" (torch.compile of the reference, GPU
only). Times are medians of triton.testing.do_bench (device events, warm-up discarded); on a
machine without a GPU the reference alone is timed with perf_counter on small shapes.
Rows go to bench/results/kernels.jsonl (one JSON object per line, appended).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or Path(__file__).resolve().parents[1] / "results")  # tests point it at a tmp dir
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# HBM bandwidth by device name (GB/s, vendor figures); unknown devices get a measured copy rate
PEAK_GBS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2039), ("H100", 3352), ("GH200", 4000),
            ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L40", 864),
            ("L4", 300), ("A10G", 600), ("A10", 600), ("RTX 4090", 1008), ("RTX 3090", 936), ("V100", 900)]


def machine() -> dict:
    gpu = torch.cuda.is_available()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "?"
    except OSError:
        commit = "?"
    import triton

    return {"device": torch.cuda.get_device_name() if gpu else f"CPU {platform.machine()} x{os.cpu_count()}",
            "commit": commit, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def peak_gbs(device_name: str) -> tuple[float, str]:
    for key, gbs in PEAK_GBS:
        if key in device_name:
            return float(gbs), "spec"
    if not torch.cuda.is_available():
        return None, "none"
    import triton.testing

    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6, "measured copy"


def time_ms(fn, gpu: bool) -> tuple[float, float, float]:
    """(median, p10, p90) in ms."""
    if gpu:
        import triton.testing

        p50, p10, p90 = triton.testing.do_bench(fn, quantiles=[0.5, 0.1, 0.9])
        return p50, p10, p90
    fn()
    ts = []
    t_end = time.perf_counter() + 0.5
    while time.perf_counter() < t_end or len(ts) < 5:
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
    return statistics.median(ts), q(0.1), q(0.9)


def main(op: str, cases, make, argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=f"benchmark the {op} kernel against its PyTorch reference")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", default=str(RESULTS / "kernels.jsonl"))
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    info = machine()
    peak, peak_src = peak_gbs(info["device"])
    if not gpu:
        print(f"[{op}] no GPU found: timing the PyTorch reference only (eager, small shapes); "
              "Triton kernels need CUDA (the interpreter is for tests, not timing)")
    dtypes = args.dtypes or (["bfloat16", "float32"] if gpu else ["float32"])
    device = "cuda" if gpu else "cpu"
    rows = []
    print(f"[{op}] {info['device']}  peak {f'{peak:.0f} GB/s' if peak else 'n/a'} ({peak_src})  commit {info['commit']}")
    for case in cases(gpu, args.quick):
        for dname in dtypes:
            dtype = DTYPES[dname]
            try:
                with torch.inference_mode():
                    made = make(case, dtype, device)
                    if made is None:
                        print(f"  {case} {dname}: too large for this device's memory, skipped")
                        continue
                    impls, nbytes, label = made
                    if not gpu:
                        impls = {"torch": impls["torch"]}
                    elif not args.no_compile:
                        impls["compile"] = torch.compile(impls["torch"], dynamic=False)
                    res = {}
                    for name, fn in impls.items():
                        try:
                            res[name] = time_ms(fn, gpu)
                        except Exception as e:  # a baseline that cannot run this size is reported, not fatal
                            print(f"  {label} {dname} {name}: failed ({type(e).__name__}: {str(e)[:120]})")
            except torch.OutOfMemoryError:
                print(f"  {label} {dname}: out of memory, skipped")
                torch.cuda.empty_cache()
                continue
            base = res.get("torch", (float("nan"),))[0]
            for name, (p50, p10, p90) in res.items():
                gbs = nbytes / p50 / 1e6
                row = {"bench": op, "impl": name, "dtype": dname, "sizes": case, "median_ms": p50, "p10_ms": p10,
                       "p90_ms": p90, "bytes": nbytes, "gb_s": gbs, "peak_gb_s": peak, "peak_source": peak_src,
                       "pct_peak": 100 * gbs / peak if peak else None, "speedup_vs_torch": base / p50,
                       "machine": info["device"], **{k: info[k] for k in ("commit", "torch", "triton", "date")}}
                rows.append(row)
                pct = f"{row['pct_peak']:5.1f}%" if row["pct_peak"] is not None else "   - "
                print(f"  {label:42s} {dname:8s} {name:8s} {p50:9.4f} ms  [{p10:.4f}, {p90:.4f}]  "
                      f"{gbs:8.1f} GB/s {pct}  x{base / p50:6.2f}")
            if gpu:
                torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"[{op}] appended {len(rows)} rows to {args.out}")
    return rows


def fits(nbytes: float, device: str, factor: float = 4.0) -> bool:
    """Whether ~factor x nbytes of working memory fits (the reference materialises copies)."""
    if device != "cuda":
        return nbytes * factor < 2e9
    free, _ = torch.cuda.mem_get_info()
    return nbytes * factor < 0.8 * free
