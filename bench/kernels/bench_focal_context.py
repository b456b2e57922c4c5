"""Focal context (all levels of one modulation layer): streaming steps of 4 frames with the
ring caches (14, 18 and 512 taps; rows at random ring phases) read in place and only the new
frames written (`triton`: the form the step's row count takes; `triton-fused`: the one fused
launch), and offline passes (`triton`: the fused kernel's long form; `triton-long`: the form
long runs take, each level as a GEMM). Bytes counted: what a step must move (each level's K-1
window frames read once, the new frames written once, inputs, outputs, weights).

    python bench/kernels/bench_focal_context.py [--quick] [--dtypes bfloat16 float32] [--no-compile]
"""
import os
import sys

import torch
from common import fits, main

from fastfocal.kernels import focal_context as fc

KS = [14, 18, 512]


def cases(gpu, quick):
    if not gpu:
        return [dict(mode="stream", B=1, T=4, C=256), dict(mode="stream", B=8, T=4, C=256),
                dict(mode="causal", B=2, T=500, C=256), dict(mode="same", B=2, T=500, C=256)]
    streams = [1, 64, 4096] if quick else [1, 64, 512, 4096]
    out = [dict(mode="stream", B=b, T=4, C=c) for c in (1024, 256) for b in streams]
    out += [dict(mode="causal", B=8, T=t, C=1024) for t in ([2048] if quick else [500, 2048, 30000])]
    out += [dict(mode="same", B=8, T=t, C=1024) for t in ([2048] if quick else [500, 30000])]
    return out


def make(case, dtype, device):
    B, T, C, mode = case["B"], case["T"], case["C"], case["mode"]
    e = torch.finfo(dtype).bits // 8
    causal = mode != "same"
    ks = KS if causal else KS[:2]
    if not fits(B * T * C * 4 * 6, device, 1.0):
        return None
    h = torch.randn(B, T, 2 * C + len(ks) + (0 if causal else 1), device=device, dtype=dtype)
    ctx, gates = h[..., C:2 * C], h[..., 2 * C:]
    ws = [torch.randn(C, 1, k, device=device, dtype=dtype) / k ** 0.5 for k in ks]
    bs = [torch.randn(C, device=device, dtype=dtype) * 0.1 for _ in ks]
    out = torch.empty(B, T, C, device=device, dtype=dtype)
    nbytes = (B * T * (2 * C + gates.shape[-1]) + sum(C * (k + 1) for k in ks)) * e
    if mode == "stream":
        caches = [torch.randn(B, C, fc.ring_len(k), device=device, dtype=dtype) for k in ks]
        idx = torch.arange(B, device=device)
        start = torch.randint(1000, 2000, (B,), device=device)  # fixed: every call the same phases
        nbytes += B * C * sum(k - 1 + T for k in ks) * e
        impls = {"triton": lambda: fc.focal_context(ctx, gates, ws, bs, True, caches, idx, start, out=out),
                 "torch": lambda: fc.focal_context_ref(ctx, gates, ws, bs, True, caches, idx, start)}
        if B >= fc.WINDOW_ROWS:  # the many-row form (window GEMM + rows kernel) against the one fused launch
            impls["triton-fused"] = lambda: _fused(ctx, gates, ws, bs, caches, idx, start, out)
    else:
        impls = {"triton": lambda: fc.focal_context(ctx, gates, ws, bs, causal, out=out),
                 "torch": lambda: fc.focal_context_ref(ctx, gates, ws, bs, causal)}
        if causal:  # what long runs take (ops.focal_context): each level as a Toeplitz GEMM
            impls["triton-long"] = lambda: fc.focal_context_long(ctx, gates, ws, bs)
    # streaming tile overrides: the fused kernel's (_blocks) and the rows kernel's (_rows_tile)
    tiles = [f"{k}={os.environ[v]}" for k, v in (("tile", "FASTFOCAL_FOCAL_TILE"), ("rows_tile", "FASTFOCAL_FOCAL_ROWS_TILE"))
             if os.environ.get(v) and mode == "stream"]
    return impls, nbytes, " ".join([f"{mode} B={B} T={T} C={C}"] + tiles)


def _fused(ctx, gates, ws, bs, caches, idx, start, out):
    rows, fc.WINDOW_ROWS = fc.WINDOW_ROWS, 1 << 62
    try:
        return fc.focal_context(ctx, gates, ws, bs, True, caches, idx, start, out=out)
    finally:
        fc.WINDOW_ROWS = rows


if __name__ == "__main__":
    main("focal_context", cases, make, sys.argv[1:])
