"""Residual add + normalisation (+ GELU) in one pass over (N, C) rows:

    x = res + (h + bias)          (optional: written out, it is the residual stream)
    y = NORM(x) [then GELU]       NORM: LayerNorm(weight, bias, eps) or DynamicTanh tanh(alpha x)

This closes the attention / modulation branch of a pre-norm block (out_proj without bias on
cuBLAS, then this) and gives the next sub-block its normed input. A program holds whole rows
(C <= 8192), so the LayerNorm statistics need no second pass.

`tail`: the programs also copy the last P frames of each row of another tensor into a cache,
the state write-back of the causal conv before this norm (that conv's kernel read the old
cache, so it cannot overwrite it itself; by this launch every read is done): one launch less
per conv in a streaming step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, TILE, check, check_device, gelu, launch_opts, out_or_new, pdl_wait, pow2, tanh



@triton.jit
def _tail_copy(src_ptr, dst_ptr, idx_ptr, TB, TT, TP, TC, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
    """dst[idx[b] (or b), :, :] = src[b, TT - TP:, :] for src (TB, TT, TC), dst (S, TP, TC),
    split over the launch's programs in BLOCK-element pieces."""
    n = TB * TP * TC
    per = TP * TC
    for e0 in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        e = e0 + tl.arange(0, BLOCK).to(tl.int64)
        m = e < n
        b = e // per
        rem = e % per
        v = tl.load(src_ptr + b * (TT * TC) + (TT - TP) * TC + rem, mask=m)
        if HAS_IDX:
            row = tl.load(idx_ptr + b, mask=m, other=0)
        else:
            row = b
        tl.store(dst_ptr + row * per + rem, v, mask=m)


@triton.jit
def _norm_kernel(h_ptr, hb_ptr, res_ptr, x_ptr, w_ptr, b_ptr, alpha_ptr, y_ptr, N, C, eps,
                 tsrc_ptr, tdst_ptr, tidx_ptr, TB, TT, TP, TC,
                 HAS_HB: tl.constexpr, HAS_RES: tl.constexpr, DYT: tl.constexpr, GELU: tl.constexpr,
                 TAIL: tl.constexpr, TAIL_IDX: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    if TAIL:
        _tail_copy(tsrc_ptr, tdst_ptr, tidx_ptr, TB, TT, TP, TC, TAIL_IDX, 1024)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    m = (r < N)[:, None] & cm[None, :]
    p = r[:, None] * C + c[None, :]
    x = tl.load(h_ptr + p, mask=m, other=0.0).to(tl.float32)
    if HAS_HB:
        x += tl.load(hb_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        x += tl.load(res_ptr + p, mask=m, other=0.0).to(tl.float32)
        xs = x.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + p, xs, mask=m)
        x = xs.to(tl.float32)  # normalise the stream as stored
    if DYT:
        y = tanh(tl.load(alpha_ptr).to(tl.float32) * x, INTERP)
    else:
        mean = tl.sum(x, 1) / C
        d = tl.where(m, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w[None, :] + b[None, :]
    if GELU:
        y = gelu(y, INTERP)
    tl.store(y_ptr + p, y.to(y_ptr.dtype.element_ty), mask=m)


def check_tail(tail) -> tuple:
    """(src, cache, idx) of a tail copy, checked: src (B, T, C) and cache (S, P, C) contiguous,
    same dtype, P <= T, idx (B,) int64 or None (cache rows b)."""
    src, cache, idx = tail
    check(src.dim() == 3 and src.is_contiguous() and cache.dim() == 3 and cache.is_contiguous()
          and cache.shape[2] == src.shape[2] and cache.shape[1] <= src.shape[1] and cache.dtype == src.dtype,
          f"tail copy: src (B, T, C) and cache (S, P <= T, C) contiguous, one dtype; got {tuple(src.shape)} "
          f"{src.dtype}, {tuple(cache.shape)} {cache.dtype}")
    check(idx is not None or cache.shape[0] == src.shape[0], "tail copy without idx: one cache row per src row")
    if idx is not None:
        check(idx.shape == (src.shape[0],) and idx.dtype == torch.long, f"tail idx must be ({src.shape[0]},) int64")
    return src, cache, idx


def tail_copy_ref(tail) -> None:
    src, cache, idx = tail
    P = cache.shape[1]
    last = src[:, src.shape[1] - P:]
    if idx is None:
        cache.copy_(last)
    else:
        cache.index_copy_(0, idx, last)


def norm(h: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
         alpha: Tensor | None = None, res: Tensor | None = None, h_bias: Tensor | None = None,
         act_gelu: bool = False, out: Tensor | None = None, x_out: Tensor | None = None, tail: tuple | None = None):
    """Launcher. LayerNorm when `alpha` is None, else DynamicTanh. With `res`: returns
    (x, y) where x = res + h + h_bias; without: y = NORM(h + h_bias). tail (src, cache, idx):
    also cache[idx] = src[:, -P:] (module docstring); src must not overlap the outputs."""
    check(h.is_contiguous(), "h must be contiguous")
    C = h.shape[-1]
    N = h.numel() // max(C, 1)
    check(C <= 8192, f"rows of at most 8192 channels, got {C}")
    dyt = alpha is not None
    if dyt:
        check(alpha.numel() == 1, "DynamicTanh alpha is one value")
    else:
        check(weight is not None and bias is not None and weight.numel() == C and bias.numel() == C, f"LayerNorm weight/bias of {C}")
    if h_bias is not None:
        check(h_bias.numel() == C, f"h_bias must hold {C} values")
    if res is not None:
        check(res.shape == h.shape, f"res must be {tuple(h.shape)}, got {tuple(res.shape)}")
        res = res.contiguous()
        x_out = out_or_new(x_out, h.shape, h.dtype, h.device)
    src, cache, tidx = check_tail(tail) if tail is not None else (h, h, None)
    check_device(h, *[v for v in (weight, bias, alpha, res, h_bias) if v is not None],
                 *([src, cache] + ([tidx] if tidx is not None else []) if tail is not None else []))
    y = out_or_new(out, h.shape, h.dtype, h.device)
    bc = pow2(C)
    br = max(1, min(TILE // bc, pow2(N)))
    TB, TT, TC = src.shape if tail is not None else (0, 0, 0)
    _norm_kernel[(max(triton.cdiv(N, br), 1),)](
        h, h_bias if h_bias is not None else h, res if res is not None else h, x_out if res is not None else h,
        weight if weight is not None else h, bias if bias is not None else h, alpha if dyt else h, y, N, C, float(eps),
        src, cache, tidx if tidx is not None else h, TB, TT, cache.shape[1] if tail is not None else 0, TC,
        HAS_HB=h_bias is not None, HAS_RES=res is not None, DYT=dyt, GELU=act_gelu,
        TAIL=tail is not None, TAIL_IDX=tidx is not None,
        BLOCK_R=br, BLOCK_C=bc, INTERP=INTERPRET, num_warps=4 if bc <= 1024 else 8,
        **launch_opts(h),
    )
    return (x_out, y) if res is not None else y


def norm_ref(h: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
             alpha: Tensor | None = None, res: Tensor | None = None, h_bias: Tensor | None = None,
             act_gelu: bool = False):
    x = h if h_bias is None else h + h_bias
    if res is not None:
        x = res + x
    y = torch.tanh(alpha * x) if alpha is not None else F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if act_gelu:
        y = F.gelu(y)
    return (x, y) if res is not None else y
