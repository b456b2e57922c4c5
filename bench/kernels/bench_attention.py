"""Gated relative-position attention (H=16, d=64): streaming steps against the 508-frame K/V
ring, offline causal (window 512) and full (non-causal) attention.

    python bench/kernels/bench_attention.py [--quick] [--dtypes ...] [--no-compile]
"""
import os
import sys

import torch
from common import fits, main

from fastfocal.kernels import attention as at

H, D, W, CHUNK = 16, 64, 512, 4


def cases(gpu, quick):
    if not gpu:
        return [dict(mode="stream", B=1, T=4), dict(mode="stream", B=8, T=4),
                dict(mode="causal", B=2, T=500), dict(mode="full", B=2, T=500)]
    streams = [1, 64, 4096] if quick else [1, 64, 512, 4096]
    out = [dict(mode="stream", B=b, T=4) for b in streams]
    out += [dict(mode="causal", B=8, T=t) for t in ([2048] if quick else [500, 2048, 30000])]
    out += [dict(mode="full", B=8, T=t) for t in ([1500] if quick else [500, 1500, 3000])]
    return out


def make(case, dtype, device):
    B, T, mode = case["B"], case["T"], case["mode"]
    C = H * D
    e = torch.finfo(dtype).bits // 8
    R = W - CHUNK
    ring_bytes = 2 * B * H * R * D * e if mode == "stream" else 0
    if not fits(ring_bytes + B * T * C * 8 * e, device, 3.0):
        return None
    qkv = torch.randn(B, T, 3 * C, device=device, dtype=dtype)
    y = torch.randn(B, T, C, device=device, dtype=dtype)
    p = [torch.randn(8, D, device=device, dtype=dtype) * 0.3, torch.randn(8, device=device, dtype=dtype) * 0.3,
         torch.randn(1, H, 1, 1, device=device, dtype=dtype), torch.randn(320, H, device=device, dtype=dtype)]
    out = torch.empty(B, T, C, device=device, dtype=dtype)
    window = None if mode == "full" else W
    nbytes = B * T * 5 * C * e  # qkv + y read, out written
    if mode == "stream":
        kr = torch.randn(B, H, R, D, device=device, dtype=dtype)
        vr = torch.randn_like(kr)
        idx = torch.arange(B, device=device)
        start = torch.full((B,), 4000, dtype=torch.long, device=device)
        nbytes += ring_bytes + 2 * B * T * C * e  # rings read, new K/V written
        impls = {"triton": lambda: at.rel_attention(qkv, y, *p, H, start, CHUNK, W, 320, 800, kr, vr, idx, out=out),
                 "torch": lambda: at.rel_attention_ref(qkv, y, *p, H, start, CHUNK, W, 320, 800, kr, vr, idx)}
    else:
        start = torch.zeros(B, dtype=torch.long, device=device)
        impls = {"triton": lambda: at.rel_attention(qkv, y, *p, H, start, CHUNK, window, 320, 800, out=out),
                 "torch": lambda: at.rel_attention_ref(qkv, y, *p, H, start, CHUNK, window, 320, 800)}
    tile = os.environ.get("FASTFOCAL_ATTN_TILE")  # streaming tile override (kernels/attention.rel_attention)
    return impls, nbytes, f"{mode} B={B} T={T}" + (f" tile={tile}" if tile and T <= 16 else "")


if __name__ == "__main__":
    main("attention", cases, make, sys.argv[1:])
