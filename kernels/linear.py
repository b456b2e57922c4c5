"""Few-row matmul with its epilogue in the same kernel, for small-batch streaming steps:

    out = ACT(res + gamma * mul * (x W^T + bias))      every part optional (see epilogue.py)

A batch-1 step has 4 rows per Linear, so each matmul is a read of the weight and nothing else;
on cuBLAS it is one launch and the epilogue another (45 epilogue launches a step, plus 6 for
focal modulation's q * (m + b)). Here each program reads a (BLOCK_N, K) slab of W once, the
few rows of x from L2, and applies the epilogue to its (rows, BLOCK_N) tile before the one store.

x may be a strided (B, T, K) view with unit stride along K: the feature extractor passes its
overlapping conv windows (row stride = conv stride * C) straight from the signal buffer, with
the weight's taps reordered to match, so the unfold copy is gone too.

Float32 accumulates IEEE products (no TF32): fp32 is the exact path.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, check, check_device, pow2
from .epilogue import ACTS, apply_epilogue


def _tile_override():
    """FASTFOCAL_LINEAR_TILE=block_n,block_k,warps,stages (the GPU sweep), read once."""
    v = os.environ.get("FASTFOCAL_LINEAR_TILE")
    if not v:
        return None
    try:
        bn, bk, w, s = (int(p) for p in v.split(","))
    except ValueError:
        raise ValueError(f"FASTFOCAL_LINEAR_TILE must be block_n,block_k,warps,stages, got {v!r}") from None
    return bn, bk, w, s


TILE_OVERRIDE = _tile_override()
BLOCK_M = 16  # tl.dot's smallest M; the rows past M are masked (no bytes read)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, res_ptr, gamma_ptr, alpha_ptr, mul_ptr, out_ptr,
                   M, N, K, T, sxb, sxt, swn, mul_sr, lo, hi,
                   HAS_BIAS: tl.constexpr, HAS_MUL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr,
                   ACT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, nm = r < M, n < N
    xrow = (r // T) * sxb + (r % T) * sxt
    wrow = n.to(tl.int64) * swn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        a = tl.load(x_ptr + xrow[:, None] + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + wrow[:, None] + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        if INTERP:  # the interpreter's bf16 dot is broken: products of the same values in fp32
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w), input_precision=PREC)
    y = apply_epilogue(acc, r, n, rm, nm, N, b_ptr, res_ptr, gamma_ptr, alpha_ptr, mul_ptr, mul_sr, lo, hi,
                       HAS_BIAS, HAS_MUL, HAS_GAMMA, HAS_RES, ACT, INTERP)
    tl.store(out_ptr + r[:, None] * N + n[None, :], y.to(out_ptr.dtype.element_ty), mask=rm[:, None] & nm[None, :])


def _rows3(x: Tensor) -> Tensor:
    """x (..., K) as a (B, T, K) view with unit stride along K (a copy only when it has none)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        return x
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-2], x.shape[-1])


def tile(M: int, N: int, K: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). On the GPU: narrow column slabs so even
    N = 1024 spreads over 64+ SMs, K in 128-byte-or-wider loads, 4 stages of loads in flight."""
    bm = min(max(BLOCK_M, pow2(M)), 64)  # more rows: more row tiles, the slab re-read from L2
    if INTERPRET:  # the interpreter pays per program: whole rows in few programs
        return bm, min(pow2(N), 512), min(pow2(K), 1024), 4, 1
    if TILE_OVERRIDE is not None:
        bn, bk, w, s = TILE_OVERRIDE
        return bm, bn, bk, w, s
    bn = 32 if triton.cdiv(N, 32) >= 128 else 16
    bk = 64 if dtype == torch.float32 else 128
    return bm, bn, bk, 4, 4


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "none", res: Tensor | None = None,
           gamma: Tensor | None = None, alpha: Tensor | None = None, mul: Tensor | None = None,
           lo: float = -1.0, hi: float = 1.0) -> Tensor:
    """ACT(res + gamma * mul * (x W^T + bias)) -> (..., N) contiguous. x (..., K), weight (N, K)
    with unit stride along K, same dtype; mul (..., N) with unit channel stride and evenly
    strided rows; res (..., N)."""
    check(act in ACTS, f"act must be one of {list(ACTS)}, got {act!r}")
    check(weight.dim() == 2 and weight.shape[1] == x.shape[-1], f"weight must be (N, {x.shape[-1]}), got {tuple(weight.shape)}")
    check(x.shape[-1] > 0, "x needs at least one input channel")
    check(x.dtype == weight.dtype, f"x and weight dtypes differ: {x.dtype} vs {weight.dtype}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    N, K = weight.shape
    x3 = _rows3(x)
    M, T = x3.shape[0] * x3.shape[1], x3.shape[1]
    lead = tuple(x.shape[:-1])
    for name, v in (("bias", bias), ("gamma", gamma), ("alpha", alpha)):
        if v is not None:
            check(v.numel() == N and v.is_contiguous(), f"{name} must hold {N} contiguous values, got {tuple(v.shape)}")
    check(act != "snake" or alpha is not None, "snake needs alpha")
    if res is not None:
        check(tuple(res.shape) == lead + (N,), f"res must be {lead + (N,)}, got {tuple(res.shape)}")
        res = res.contiguous()
    mul_sr = 0
    if mul is not None:
        check(tuple(mul.shape) == lead + (N,), f"mul must be {lead + (N,)}, got {tuple(mul.shape)}")
        if mul.stride(-1) != 1 or mul.dim() < 2 or not all(
                mul.stride(i) == mul.stride(i + 1) * mul.shape[i + 1] for i in range(mul.dim() - 2)):
            mul = mul.contiguous()
        mul_sr = mul.stride(-2)
    check_device(x3, weight, *[v for v in (bias, res, gamma, alpha, mul) if v is not None])
    out = torch.empty(lead + (N,), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    bm, bn, bk, warps, stages = tile(M, N, K, x.dtype)
    _linear_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x3, weight, bias if bias is not None else weight, res if res is not None else out,
        gamma if gamma is not None else weight, alpha if alpha is not None else weight,
        mul if mul is not None else out, out, M, N, K, T, x3.stride(0), x3.stride(1), weight.stride(0), mul_sr,
        float(lo), float(hi), HAS_BIAS=bias is not None, HAS_MUL=mul is not None, HAS_GAMMA=gamma is not None,
        HAS_RES=res is not None, ACT=ACTS[act], PREC="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INTERP=INTERPRET, num_warps=warps, num_stages=stages,
    )
    return out


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "none", res: Tensor | None = None,
               gamma: Tensor | None = None, alpha: Tensor | None = None, mul: Tensor | None = None,
               lo: float = -1.0, hi: float = 1.0) -> Tensor:
    from .epilogue import epilogue_ref

    h = torch.nn.functional.linear(x, weight, bias)
    if mul is not None:
        h = h * mul
    return epilogue_ref(h, None, act, res=res, gamma=gamma, alpha=alpha, lo=lo, hi=hi)
