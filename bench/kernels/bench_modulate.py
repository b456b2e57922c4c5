"""Modulate: q * (context_proj(acc) + bias), q a strided slice of in_proj's output.

    python bench/kernels/bench_modulate.py [--quick] [--dtypes ...] [--no-compile]
"""
import sys

import torch
from common import fits, main

from fastfocal.kernels import modulate as md


def cases(gpu, quick):
    shapes = [(1, 4), (64, 4), (4096, 4), (8, 2048)] if gpu else [(1, 4), (8, 4), (2, 500)]
    if quick:
        shapes = shapes[-2:]
    return [dict(B=b, T=t, C=c) for c in (1024, 256) for b, t in shapes]


def make(case, dtype, device):
    B, T, C = case["B"], case["T"], case["C"]
    e = torch.finfo(dtype).bits // 8
    if not fits(B * T * C * 6 * e, device, 2.0):
        return None
    q = torch.randn(B, T, 2 * C + 3, device=device, dtype=dtype)[..., :C]
    m = torch.randn(B, T, C, device=device, dtype=dtype)
    b = torch.randn(C, device=device, dtype=dtype)
    out = torch.empty_like(m)
    # the elementwise part only: the matmul is cuBLAS in both
    impls = {"triton": lambda: md.modulate(q, m, b, out=out), "torch": lambda: q * (m + b)}
    return impls, 3 * m.numel() * e, f"B={B} T={T} C={C}"


if __name__ == "__main__":
    main("modulate", cases, make, sys.argv[1:])
