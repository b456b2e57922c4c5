"""bf16 vs fp32 token agreement on real speech (per token and per bit).

    python bench/bf16_agreement.py --model tests/data/tiny_causal
    python bench/bf16_agreement.py --random-init 50hz_4k_causal --files 4
"""
import argparse
import glob
import os

import torch

import fastfocal
from fastfocal.audio import read_audio

ap = argparse.ArgumentParser()
ap.add_argument("--model")
ap.add_argument("--random-init")
ap.add_argument("--audio", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "audio"))
ap.add_argument("--files", type=int, default=8)
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = ap.parse_args()


def make(dtype):
    if args.random_init:
        return fastfocal.random_init(args.random_init, seed=0, device=args.device, dtype=dtype)
    return fastfocal.load(args.model, device=args.device, dtype=dtype)


files = sorted(glob.glob(os.path.join(args.audio, "**", "*.wav"), recursive=True))[: args.files]
if not files:
    raise SystemExit(f"no .wav files under {args.audio}")
sigs = [torch.from_numpy(read_audio(f)) for f in files]
ref = [make("float32").sig_to_toks(s) for s in sigs]
low = make("bfloat16")
D = low.code_dim
n = tok = bits = 0
for s, r in zip(sigs, ref):
    t = low.sig_to_toks(s)
    n += t.numel()
    tok += int((t == r).sum())
    x = t ^ r
    bits += sum(int(((x >> i) & 1).sum()) for i in range(D))
name = args.model or f"random-init {args.random_init}"
print(f"{name}, {len(files)} files, {n} tokens, {args.device}: bf16 token agreement {tok / n:.4f}, "
      f"bit agreement {1 - bits / (n * D):.5f}")
