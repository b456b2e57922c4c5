"""bf16 vs fp32 token agreement on real speech (per token and per bit).

    python bench/bf16_agreement.py --model tests/data/tiny_causal
    python bench/bf16_agreement.py --random-init 50hz_4k_causal --files 4
    python bench/bf16_agreement.py --model tests/data/tiny_causal --stream   # bf16 in 80 ms chunks

fp32 tokens are the reference (offline and streaming agree exactly in fp32); --stream feeds
the bf16 codec one 1280-sample chunk at a time (the voice-app path) instead of offline.
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
ap.add_argument("--stream", action="store_true", help="bf16 tokens from 80 ms streaming chunks")
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


def bf16_tokens(s):
    if not args.stream:
        return low.sig_to_toks(s)
    enc = low.stream_encoder()
    with torch.inference_mode():
        parts = [enc.push(s[None, a:a + 1280]) for a in range(0, s.shape[0] - 1279, 1280)]
        parts.append(enc.flush())
    return torch.cat(parts, 1)[0]


for s, r in zip(sigs, ref):
    t = bf16_tokens(s)
    r = r[: t.shape[-1]] if r.dim() == 1 else r[..., : t.shape[-1]]
    n += t.numel()
    tok += int((t == r).sum())
    x = t ^ r
    bits += sum(int(((x >> i) & 1).sum()) for i in range(D))
name = args.model or f"random-init {args.random_init}"
print(f"{name}, {len(files)} files, {n} tokens, {args.device}, {'streaming' if args.stream else 'offline'}: bf16 token agreement {tok / n:.4f}, "
      f"bit agreement {1 - bits / (n * D):.5f}")
