"""Batch-1 CPU chunk step against the weight-read floor, measured in the same run.

For each thread count (1, 2) and mode (full codec, decoder only) and dtype (fp32, bf16): the
median wall time of `Pipeline.step` on one 80 ms chunk of real speech (full-size random weights,
after warm-up), the floor = bytes of the weights the step reads / the single-pass read bandwidth
(`torch.sum` over a 1 GiB tensor at the same thread count, one pass after every step so a loaded
machine slows both), and their ratio: of the medians, the median of the per-step ratios, and of
the least-disturbed samples (p10 step over the floor at the p90 bandwidth). With onnxruntime installed, also ONNX Runtime's
step on the same weights (fp32, exported once per mode with fastfocal.onnx, cached).

Each row runs in a fresh process (in one process, a row measured after others can run up to 25%
slower: bf16 after fp32 did). Appends one JSON line per row to bench/results/cpu-step.jsonl and
prints a table.

    python bench/cpu_step.py                             # ~5 min on 2 cores (plus a first ONNX export)
    python bench/cpu_step.py --threads 1 --modes decode --dtypes fp32 --no-onnx
    python bench/cpu_step.py --profile full --dtypes fp32   # torch.profiler table of the step instead
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fastfocal
from e2e import cpu_isa  # bench/ is on sys.path when run as a script
from fastfocal.audio import read_audio
from fastfocal.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or ROOT / "bench" / "results")  # tests point it at a tmp dir
SPEECH = [ROOT.parent / "shared" / "audio" / "librispeech-dev-clean", Path("/work/shared/audio/librispeech-dev-clean"),
          ROOT / "tests" / "data" / "audio"]
CACHE = Path(os.environ.get("FASTFOCAL_BENCH_CACHE", "/tmp/fastfocal-bench"))
STAGES = {"full": ("encoder", "compressor", "decompressor", "decoder"), "encode": ("encoder", "compressor"),
          "decode": ("decompressor", "decoder")}


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x{os.cpu_count()}"


def commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "fastfocal", "kernels"], cwd=ROOT).returncode
        return (r.stdout.strip() or "?") + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def speech(seconds: float) -> np.ndarray:
    """Real speech: utterances joined to at least `seconds`, whole chunks."""
    d = next(p for p in SPEECH if p.is_dir())
    parts, n = [], 0
    for f in sorted(d.rglob("*.wav")):
        parts.append(read_audio(f, 16000))
        n += len(parts[-1])
        if n >= seconds * 16000:
            break
    sig = np.concatenate(parts)
    return sig[: len(sig) // 1280 * 1280]


def weight_bytes(codec, mode: str) -> int:
    """Bytes of the weights one chunk step reads: each weight once (the memory-traffic floor)."""
    return sum(p.numel() * p.element_size() for s in STAGES[mode] for p in getattr(codec.model, s).parameters())


class Bandwidth:
    """Single-pass read bandwidth: torch.sum over a 1 GiB tensor (far beyond any cache)."""

    def __init__(self, gib: float = 1.0):
        self.x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        self.x.sum()  # touch every page

    def once(self) -> float:
        t = time.perf_counter()
        self.x.sum()
        return self.x.numel() * 4 / (time.perf_counter() - t)


def chunks_for(codec, mode: str, sig: np.ndarray) -> list[torch.Tensor]:
    """The step inputs: audio chunks, or (decode) the tokens this model gives for them."""
    x = torch.from_numpy(sig)[None]
    if mode == "decode":
        with torch.inference_mode():
            toks = codec.stream_encoder().push(x)
        return [toks[:, a:a + 4].contiguous() for a in range(0, toks.shape[1] - 3, 4)]
    return [x[:, a:a + 1280].to(codec.dtype).contiguous() for a in range(0, x.shape[1], 1280)]


class CoreSpeed:
    """A fixed in-cache fp32 matmul (256 x 256 x 256, ~0.26 MB), GFLOP/s: on a shared machine
    the core's speed moves (a busy hyperthread sibling, another tenant) while the memory floor
    does not, so a row's step can be slow for reasons no code change fixes. Reported per row."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
        torch.mm(self.a, self.b)

    def once(self) -> float:
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(self.a, self.b)
        return 4 * 2 * 256 ** 3 / (time.perf_counter() - t)


def time_steps(step, inputs, warmup: int, steps: int, bw: Bandwidth, core: CoreSpeed):
    """Step times (s) after warm-up, each followed by a bandwidth pass and a core-speed probe:
    a load burst from other processes then slows a step and the floor measured next to it
    alike (paired ratios). Returns (step times, bandwidths, core speeds)."""
    ts, bws, cores = [], [], []
    for i in range(warmup + steps):
        x = inputs[i % len(inputs)]
        t = time.perf_counter()
        step(x)
        dt = time.perf_counter() - t
        if i >= warmup:
            ts.append(dt)
            bws.append(bw.once())
            cores.append(core.once())
    return ts, bws, cores


def fastfocal_step(codec, mode: str):
    pipe = Pipeline(codec.model, mode, 1)
    idx = torch.zeros(1, dtype=torch.long)

    def step(x):
        with torch.inference_mode():
            return pipe.step(x, idx)
    return step


def onnx_step(codec, mode: str, threads: int, weights_key: str):
    from fastfocal.onnx import OnnxStream, export

    path = CACHE / f"{weights_key}-{mode}.onnx"
    if not path.exists():
        t = time.perf_counter()
        export(codec, path.with_suffix(".tmp.onnx"), mode, 1)
        path.with_suffix(".tmp.onnx").rename(path)
        print(f"  exported {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    s = OnnxStream(path, threads=threads)

    def step(x):
        out, s.state = s.step(x.numpy())  # the state advances, as fastfocal's step does
        return out
    return step


def profile(codec, mode: str, sig, warmup: int, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    step, inputs = fastfocal_step(codec, mode), chunks_for(codec, mode, sig)
    for i in range(warmup):
        step(inputs[i % len(inputs)])
    with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        for i in range(steps):
            step(inputs[(warmup + i) % len(inputs)])
    print(f"## {mode} {str(codec.dtype).removeprefix('torch.')} threads={torch.get_num_threads()} ({steps} steps)")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=top))


def report(a, base: dict, rows: list[dict]) -> None:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\n{base['machine']}, commit {base['commit']}, torch {base['torch']}, {a.preset}, batch 1, "
          f"median of {a.steps} steps after {a.warmup} warm-up\n")
    print("| threads | mode | dtype | impl | step ms | floor ms | ratio | paired | p10 ratio | read GB/s | core GFLOP/s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['mode']} | {r['dtype']} | {r['impl']} | {r['step_ms']:.1f} | {r['floor_ms']:.1f} | "
              f"{r['ratio']:.2f} | {r['ratio_paired']:.2f} | {r['ratio_p10']:.2f} | {r['read_gbps']} | "
              f"{r.get('core_gflops', '')} | {r['loadavg_1m']} |")


def isolated(a, threads: list[int]) -> int:
    """Each row in a fresh process (this script with --in-process for one configuration)."""
    import tempfile

    rows = []
    for t in threads:
        for mode in a.modes.split(","):
            configs = [(d, "--no-onnx") for d in a.dtypes.split(",")] + ([("fp32", "--only-onnx")] if not a.no_onnx else [])
            for dtype, flag in configs:
                with tempfile.NamedTemporaryFile(suffix=".jsonl") as tmp:
                    cmd = [sys.executable, __file__, "--in-process", flag, "--threads", str(t), "--modes", mode,
                           "--dtypes", dtype, "--preset", a.preset, "--warmup", str(a.warmup), "--steps", str(a.steps),
                           "--out", tmp.name]
                    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
                    rows += [json.loads(line) for line in open(tmp.name)]
    report(a, rows[0] if rows else {}, rows)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="50hz_4k_causal")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--modes", default="full,decode")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime rows")
    ap.add_argument("--profile", metavar="MODE", help="print a torch.profiler table for MODE instead of timing")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=str(RESULTS / "cpu-step.jsonl"))
    ap.add_argument("--in-process", action="store_true",
                    help="all rows in this process (default: one fresh process per row; in one process a row "
                         "measured after others can run up to 25%% slower, e.g. bf16 after fp32)")
    ap.add_argument("--only-onnx", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    if not a.profile and not a.in_process:
        return isolated(a, threads)

    sig = speech(30.0)
    codecs = {d: fastfocal.random_init(a.preset, seed=0, device="cpu", dtype={"fp32": "float32", "bf16": "bfloat16"}[d])
              for d in a.dtypes.split(",")}
    if a.profile:
        for t in threads:
            torch.set_num_threads(t)
            for c in codecs.values():
                profile(c, a.profile, sig, a.warmup, min(a.steps, 20), a.top)
        return 0

    try:
        import onnxruntime  # noqa: F401
        have_ort = not a.no_onnx and "fp32" in codecs
    except ImportError:
        have_ort = False
    # the cached graph is of these weights and this code: a change to either exports anew
    src = b"".join(p.read_bytes() for d in ("fastfocal", "kernels") for p in sorted((ROOT / d).glob("*.py")))
    key = hashlib.sha1(a.preset.encode() + b"-seed0-" + src).hexdigest()[:12]
    bw, core = Bandwidth(), CoreSpeed()
    base = {"machine": machine(), "cpu_isa": cpu_isa(), "commit": commit(), "torch": torch.__version__, "preset": a.preset,
            "date": time.strftime("%Y-%m-%d %H:%M"), "batch": 1}
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for mode in a.modes.split(","):
            # fastfocal rows first, ONNX Runtime last and freed after (its pool threads spin)
            runs = [] if a.only_onnx else [(d, "fastfocal") for d in codecs]
            runs += [("fp32", "onnxruntime")] if have_ort else []
            for dname, impl in runs:
                codec = codecs[dname]
                inputs = chunks_for(codec, mode, sig)
                step = fastfocal_step(codec, mode) if impl == "fastfocal" else onnx_step(codec, mode, t, key)
                load = os.getloadavg()[0]
                ts, bws, cores = time_steps(step, inputs, a.warmup, a.steps, bw, core)
                bps = statistics.median(bws)
                wb = weight_bytes(codec, mode)
                step_ms, floor_ms = 1e3 * statistics.median(ts), 1e3 * wb / bps
                paired = statistics.median(s_ * b_ / wb for s_, b_ in zip(ts, bws))  # step_i / floor_i
                row = {**base, "threads": t, "dtype": dname, "mode": mode, "impl": impl,
                       "step_ms": round(step_ms, 2), "step_p10_ms": round(1e3 * np.percentile(ts, 10), 2),
                       "floor_ms": round(floor_ms, 2), "ratio": round(step_ms / floor_ms, 2),
                       "ratio_paired": round(paired, 2),
                       # least-disturbed samples: p10 step over the floor at the p90 bandwidth
                       "ratio_p10": round(np.percentile(ts, 10) * np.percentile(bws, 90) / wb, 2),
                       "read_gbps": round(bps / 1e9, 1), "weight_mb": round(wb / 1e6, 1), "steps": len(ts),
                       "core_gflops": round(statistics.median(cores) / 1e9, 1), "loadavg_1m": round(load, 2)}
                rows.append(row)
                del step
                gc.collect()
                print(f"  {t} thr {mode:6} {dname} {impl:11} step {step_ms:7.1f} ms  floor {floor_ms:6.1f} ms"
                      f"  ratio {step_ms / floor_ms:5.2f}  paired {paired:5.2f}  p10 {row['ratio_p10']:5.2f}"
                      f"  ({bps / 1e9:.1f} GB/s, core {row['core_gflops']} GFLOP/s, load {load:.1f})", file=sys.stderr)
    report(a, base, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
