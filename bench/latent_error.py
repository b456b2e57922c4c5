"""How far bf16 latents sit from fp32 before the sign decides the token: relative L1 error of
the compressor's output and the count of sign flips, offline, on real speech. A steadier
measure than token agreement, whose count moves with which latents happen to sit near zero.

    python bench/latent_error.py --files 12          # full-size random weights, CPU
"""
import argparse
import glob
from pathlib import Path

import torch

import fastfocal
from fastfocal.audio import read_audio
from fastfocal.pipeline import run_offline

ap = argparse.ArgumentParser()
ap.add_argument("--random-init", default="50hz_4k_causal")
ap.add_argument("--files", type=int, default=12)
ap.add_argument("--audio", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "audio"))
ap.add_argument("--device", default="cpu")
a = ap.parse_args()
files = sorted(glob.glob(f"{a.audio}/**/*.wav", recursive=True))[: a.files]
sigs = [torch.from_numpy(read_audio(f))[None] for f in files]
m32 = fastfocal.random_init(a.random_init, seed=0, device=a.device, dtype="float32")
m16 = fastfocal.random_init(a.random_init, seed=0, device=a.device, dtype="bfloat16")
num = den = flips = n = 0
with torch.inference_mode():
    for s in sigs:
        ref = run_offline(m32.model, "encode", s.to(a.device), ["lats"])["lats"].double()
        low = run_offline(m16.model, "encode", s.to(a.device, torch.bfloat16), ["lats"])["lats"].double()
        num += (ref - low).abs().sum().item()
        den += ref.abs().sum().item()
        flips += int(((ref > 0) != (low > 0)).sum())
        n += ref.numel()
print(f"{a.random_init}, {len(files)} files: bf16 latents rel L1 error {num / den:.5f}, sign flips {flips}/{n} = {flips / n:.5f}")
