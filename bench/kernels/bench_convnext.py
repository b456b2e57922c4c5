"""ConvNeXt front (WaveNeXt, C=1024): causal 7-tap depthwise conv + LayerNorm, streaming with
the zero-initialised cache, and offline.

    python bench/kernels/bench_convnext.py [--quick] [--dtypes ...] [--no-compile]
"""
import sys

import torch
from common import fits, main

from fastfocal.kernels import convnext as cx


def cases(gpu, quick):
    if not gpu:
        return [dict(mode="stream", B=1, T=4, C=1024), dict(mode="stream", B=8, T=4, C=1024), dict(mode="causal", B=2, T=500, C=1024)]
    streams = [1, 64, 4096] if quick else [1, 64, 512, 4096]
    return [dict(mode="stream", B=b, T=4, C=1024) for b in streams] + \
        [dict(mode=m, B=8, T=t, C=1024) for m in ("causal", "same") for t in ([2048] if quick else [500, 2048, 30000])]


def make(case, dtype, device):
    B, T, C, mode = case["B"], case["T"], case["C"], case["mode"]
    e = torch.finfo(dtype).bits // 8
    if not fits(B * T * C * 4 * e, device, 3.0):
        return None
    x = torch.randn(B, T, C, device=device, dtype=dtype)
    p = [torch.randn(C, 1, 7, device=device, dtype=dtype) * 0.4, torch.randn(C, device=device, dtype=dtype),
         torch.randn(C, device=device, dtype=dtype), torch.randn(C, device=device, dtype=dtype)]
    out = torch.empty_like(x)
    nbytes = 2 * x.numel() * e
    causal = mode != "same"
    if mode == "stream":
        cache = torch.zeros(B, C, 6, device=device, dtype=dtype)
        idx = torch.arange(B, device=device)
        nbytes += 2 * cache.numel() * e
        impls = {"triton": lambda: cx.dwconv_layer_norm(x, *p, 1e-6, True, cache, idx, out=out),
                 "torch": lambda: cx.dwconv_layer_norm_ref(x, *p, 1e-6, True, cache, idx)}
    else:
        impls = {"triton": lambda: cx.dwconv_layer_norm(x, *p, 1e-6, causal, out=out),
                 "torch": lambda: cx.dwconv_layer_norm_ref(x, *p, 1e-6, causal)}
    return impls, nbytes, f"{mode} B={B} T={T} C={C}"


if __name__ == "__main__":
    main("convnext", cases, make, sys.argv[1:])
