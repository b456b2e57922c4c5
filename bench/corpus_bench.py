"""encode-corpus on a synthetic many-file corpus: does the corpus path feed the model?

Builds N files of random lengths (uniform 2-15 s, like LibriSpeech/VoiceBank utterances) cut from
real speech, written as 16 kHz and 44.1 kHz wav/flac, runs `encode_corpus` on them with default
batching, and reports in one row: corpus audio-h/s, the model's own throughput in the same process
(one batch of equal-length 10 s clips, as many rows as the corpus run's full calls), their ratio
(target >= 0.8 on a GPU), the model-busy fraction of the run (CUDA: event-timed model calls /
wall; CPU: the same with host timers), decode+resample throughput of one worker, and which side
bounds the run. Appends to bench/results/corpus.jsonl.

    python bench/corpus_bench.py --model tests/data/tiny_causal --device cpu --files 40
    python bench/corpus_bench.py --random-init 50hz_4k_causal --dtype bf16 --device cuda --files 2000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastfocal import corpus  # noqa: E402
from fastfocal.audio import read_audio  # noqa: E402
from fastfocal.loading import open_codec  # noqa: E402

FORMATS = [(16000, "wav"), (16000, "flac"), (44100, "wav"), (44100, "flac")]


def speech_pool(audio_dir: Path, max_s: float) -> np.ndarray:
    files = sorted(p for p in audio_dir.rglob("*") if p.suffix.lower() in corpus.AUDIO_EXTS)
    sigs, total = [], 0
    for p in files:
        sigs.append(read_audio(p, 16000))
        total += len(sigs[-1])
        if total > max_s * 16000:
            break
    if not sigs:
        raise SystemExit(f"no audio under {audio_dir}")
    return np.concatenate(sigs)


def build_corpus(d: Path, n: int, lo: float, hi: float, seed: int, audio_dir: Path) -> float:
    rng = np.random.default_rng(seed)
    pool = speech_pool(audio_dir, 600)
    total = 0.0
    for i in range(n):
        s = float(rng.uniform(lo, hi))
        k = int(s * 16000)
        o = int(rng.integers(0, max(1, len(pool) - k)))
        x = np.resize(pool[o:o + k], k)  # wraps when the pool is short
        sr, ext = FORMATS[i % len(FORMATS)]
        if sr != 16000:
            x = soxr.resample(x, 16000, sr, quality="HQ")
        sub = d / f"spk{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        sf.write(sub / f"utt{i:05d}.{ext}", x, sr, subtype="PCM_16")
        total += s
    return total


def decode_rate(d: Path, n: int = 24) -> dict:
    """Audio-s per second of one worker doing what a corpus worker does (`corpus._load`:
    sha256, read, resample to 16 kHz, peak check), per source format and overall."""
    files = sorted(p for p in d.rglob("*") if p.suffix in (".wav", ".flac"))
    by_fmt: dict[str, list[float]] = {}
    secs = wall = 0.0
    for p in files[:n]:
        t = time.perf_counter()
        sig, _ = corpus._load(str(p))
        dt = time.perf_counter() - t
        key = f"{sf.info(p).samplerate // 1000}k-{p.suffix[1:]}"
        by_fmt.setdefault(key, [0.0, 0.0])
        by_fmt[key][0] += len(sig) / 16000
        by_fmt[key][1] += dt
        secs += len(sig) / 16000
        wall += dt
    return {"per_worker": secs / wall, "by_format": {k: round(a / b, 1) for k, (a, b) in by_fmt.items()}}


def model_rate(codec, rows: int, seconds: float = 10.0, reps: int = 3) -> float:
    """Audio-s per second of sig_to_toks on one batch of `rows` equal-length clips (median)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, int(seconds * 16000), generator=g) * 0.1).to(codec.device)
    sync = torch.cuda.synchronize if codec.device.type == "cuda" else (lambda: None)
    codec.sig_to_toks(x)  # warm-up (Triton compiles, allocator)
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        codec.sig_to_toks(x)
        sync()
        times.append(time.perf_counter() - t)
    return rows * seconds / float(np.median(times))


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.machine()} x{os.cpu_count()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--model", default=None)
    g.add_argument("--random-init", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--min-s", type=float, default=2.0)
    ap.add_argument("--max-s", type=float, default=15.0)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="as encode-corpus's default")
    ap.add_argument("--audio", default=str(ROOT.parent / "shared" / "audio"), help="real speech to cut files from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the encoding process (default: torch's); "
                    "on a shared or busy CPU use 1: OpenMP threads that get descheduled spin at every barrier")
    ap.add_argument("--results", default=str(Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or ROOT / "bench" / "results") / "corpus.jsonl"))
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    audio = Path(args.audio) if Path(args.audio).is_dir() else ROOT / "tests" / "data" / "audio"

    with tempfile.TemporaryDirectory(prefix="corpus_bench_") as tmp:
        src = Path(tmp) / "src"
        audio_s = build_corpus(src, args.files, args.min_s, args.max_s, args.seed, audio)
        dec = decode_rate(src)
        total = corpus.encode_corpus([str(src)], Path(tmp) / "out", model=args.model, random_init=args.random_init,
                                     devices=[device], dtype=args.dtype, workers=args.workers, quiet=True)
        codec = open_codec(args.model, args.random_init, device, args.dtype)
        own = model_rate(codec, total.get("rows", 1))
    corpus_rate = total["seconds"] / total["encode_s"]
    decode_cap = dec["per_worker"] * max(args.workers, 1)
    bound = "decode (CPU workers)" if decode_cap < own else "model"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    row = {
        "bench": "corpus", "machine": machine(device), "device": device, "commit": commit,
        "time": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
        "model": args.model or f"random-init {args.random_init}", "dtype": args.dtype,
        "files": total["files"], "errors": total["errors"], "audio_h": round(total["seconds"] / 3600, 4),
        "workers": args.workers, "threads": torch.get_num_threads(), "slots": total.get("slots"), "rows_per_call": total.get("rows"),
        "segment_frames": total.get("segment_frames"), "calls": total.get("calls"),
        "mean_rows_per_call": round(total["row_calls"] / max(total["calls"], 1), 1),
        "corpus_audio_h_per_s": round(corpus_rate / 3600, 5), "corpus_x_realtime": round(corpus_rate, 1),
        "model_x_realtime": round(own, 1), "ratio": round(corpus_rate / own, 3),
        "model_busy": round(total["model_s"] / total["encode_s"], 3),
        "decode_x_realtime_per_worker": round(dec["per_worker"], 1), "decode_by_format": dec["by_format"],
        "decode_capacity_x_realtime": round(decode_cap, 1), "bound": bound,
        "wall_s": round(total["encode_s"], 2), "built_audio_h": round(audio_s / 3600, 4),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    print(f"corpus {corpus_rate:.1f}x real time ({row['corpus_audio_h_per_s']:.3g} audio-h/s) vs model alone "
          f"{own:.1f}x (batch {total.get('rows')} x 10 s): {corpus_rate / own:.0%}; model busy "
          f"{row['model_busy']:.0%} of the run; decode {dec['per_worker']:.0f}x per worker x {args.workers} = "
          f"{decode_cap:.0f}x; bound: {bound}")


if __name__ == "__main__":
    main()
