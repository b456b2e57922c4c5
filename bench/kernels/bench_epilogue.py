"""Matmul epilogues after cuBLAS: bias+GELU (FFN / refiner / ConvNeXt hidden), bias*gamma +
residual (ConvNeXt), bias+clamp (WaveNeXt head, 480 samples per frame), bias+Snake.

    python bench/kernels/bench_epilogue.py [--quick] [--dtypes ...] [--no-compile]
"""
import sys

import torch
from common import fits, main

from fastfocal.kernels import epilogue as ep


def cases(gpu, quick):
    shapes = [(1, 4), (64, 4), (4096, 4), (8, 2048)] if gpu else [(1, 4), (8, 4), (2, 500)]
    if quick:
        shapes = shapes[-2:]
    kinds = [("gelu", 4096), ("residual_gamma", 1024), ("clamp", 480), ("snake", 1024)]
    return [dict(kind=k, B=b, T=t, C=c) for k, c in kinds for b, t in shapes]


def make(case, dtype, device):
    B, T, C, kind = case["B"], case["T"], case["C"], case["kind"]
    e = torch.finfo(dtype).bits // 8
    if not fits(B * T * C * 4 * e, device, 2.0):
        return None
    h = torch.randn(B, T, C, device=device, dtype=dtype)
    b = torch.randn(C, device=device, dtype=dtype)
    kw = {}
    n_in = 1
    if kind == "gelu":
        kw = dict(act="gelu")
    elif kind == "residual_gamma":
        kw = dict(res=torch.randn_like(h), gamma=torch.randn(C, device=device, dtype=dtype))
        n_in = 2
    elif kind == "clamp":
        kw = dict(act="clamp")
    else:
        kw = dict(act="snake", alpha=torch.rand(C, device=device, dtype=dtype) + 0.5)
    out = torch.empty_like(h)
    nbytes = (n_in + 1) * h.numel() * e
    impls = {"triton": lambda: ep.epilogue(h, b, out=out, **kw), "torch": lambda: ep.epilogue_ref(h, b, **kw)}
    return impls, nbytes, f"{kind} B={B} T={T} C={C}"


if __name__ == "__main__":
    main("epilogue", cases, make, sys.argv[1:])
