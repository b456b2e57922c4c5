"""Residual add + LayerNorm (encoder, C=1024) or DynamicTanh (focal blocks), one pass.

    python bench/kernels/bench_norm.py [--quick] [--dtypes ...] [--no-compile]
"""
import sys

import torch
from common import fits, main

from fastfocal.kernels import norm as nm


def cases(gpu, quick):
    shapes = [(1, 4), (64, 4), (4096, 4), (8, 2048)] if gpu else [(1, 4), (8, 4), (2, 500)]
    if quick:
        shapes = shapes[-2:]
    return [dict(kind=k, B=b, T=t, C=c) for k, c in (("ln_res", 1024), ("dyt_res", 1024), ("dyt_res", 256)) for b, t in shapes]


def make(case, dtype, device):
    B, T, C, kind = case["B"], case["T"], case["C"], case["kind"]
    e = torch.finfo(dtype).bits // 8
    if not fits(B * T * C * 6 * e, device, 2.0):
        return None
    h, res = torch.randn(B, T, C, device=device, dtype=dtype), torch.randn(B, T, C, device=device, dtype=dtype)
    hb = torch.randn(C, device=device, dtype=dtype)
    if kind == "ln_res":
        kw = dict(weight=torch.randn(C, device=device, dtype=dtype), bias=torch.randn(C, device=device, dtype=dtype), eps=1e-5)
    else:
        kw = dict(alpha=torch.tensor([0.5], device=device, dtype=dtype))
    x_out, y = torch.empty_like(h), torch.empty_like(h)
    nbytes = 4 * h.numel() * e  # h, res read; stream and normed written
    impls = {"triton": lambda: nm.norm(h, res=res, h_bias=hb, out=y, x_out=x_out, **kw),
             "torch": lambda: nm.norm_ref(h, res=res, h_bias=hb, **kw)}
    return impls, nbytes, f"{kind} B={B} T={T} C={C}"


if __name__ == "__main__":
    main("norm", cases, make, sys.argv[1:])
