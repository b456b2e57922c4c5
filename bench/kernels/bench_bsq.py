"""BSQ: normalise + sign + token packing + codes (D=12) in one pass; tokens -> decompressor
in_proj (D=12 -> 256) as a signed sum of weight columns.

    python bench/kernels/bench_bsq.py [--quick] [--dtypes ...] [--no-compile]
"""
import sys

import torch
from common import fits, main

from fastfocal.kernels import bsq


def cases(gpu, quick):
    shapes = [(1, 4), (64, 4), (4096, 4), (8, 2048), (8, 30000)] if gpu else [(1, 4), (8, 4), (2, 500)]
    if quick:
        shapes = shapes[2:4] if gpu else shapes
    return [dict(kind=k, B=b, T=t, D=12) for k in ("quantize", "token_proj") for b, t in shapes]


def make(case, dtype, device):
    B, T, D, kind = case["B"], case["T"], case["D"], case["kind"]
    e = torch.finfo(dtype).bits // 8
    if not fits(B * T * 256 * e, device, 2.0):
        return None
    if kind == "quantize":
        x = torch.randn(B, T, D, device=device, dtype=dtype)
        impls = {"triton": lambda: bsq.bsq(x), "torch": lambda: bsq.bsq_ref(x)}
        nbytes = B * T * (3 * D * e + 8)
    else:
        toks = torch.randint(0, 2 ** D, (B, T), device=device)
        w, b = torch.randn(256, D, device=device, dtype=dtype), torch.randn(256, device=device, dtype=dtype)
        out = torch.empty(B, T, 256, device=device, dtype=dtype)
        impls = {"triton": lambda: bsq.code_proj(toks, w, b, D, dtype, out=out),
                 "torch": lambda: bsq.code_proj_ref(toks, w, b, D, dtype)}
        nbytes = B * T * (8 + 256 * e)
    return impls, nbytes, f"{kind} B={B} T={T} D={D}"


if __name__ == "__main__":
    main("bsq", cases, make, sys.argv[1:])
