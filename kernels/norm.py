"""Residual add + normalisation (+ GELU) in one pass over (N, C) rows:

    x = res + (h + bias)          (optional: written out, it is the residual stream)
    y = NORM(x) [then GELU]       NORM: LayerNorm(weight, bias, eps) or DynamicTanh tanh(alpha x)

This closes the attention / modulation branch of a pre-norm block (out_proj without bias on
cuBLAS, then this) and gives the next sub-block its normed input. A program holds whole rows
(C <= 8192), so the LayerNorm statistics need no second pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, TILE, check, check_device, gelu, out_or_new, pow2, tanh



@triton.jit
def _norm_kernel(h_ptr, hb_ptr, res_ptr, x_ptr, w_ptr, b_ptr, alpha_ptr, y_ptr, N, C, eps,
                 HAS_HB: tl.constexpr, HAS_RES: tl.constexpr, DYT: tl.constexpr, GELU: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERP: tl.constexpr):
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


def norm(h: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
         alpha: Tensor | None = None, res: Tensor | None = None, h_bias: Tensor | None = None,
         act_gelu: bool = False, out: Tensor | None = None, x_out: Tensor | None = None):
    """Launcher. LayerNorm when `alpha` is None, else DynamicTanh. With `res`: returns
    (x, y) where x = res + h + h_bias; without: y = NORM(h + h_bias)."""
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
    check_device(h, *[v for v in (weight, bias, alpha, res, h_bias) if v is not None])
    y = out_or_new(out, h.shape, h.dtype, h.device)
    bc = pow2(C)
    br = max(1, min(TILE // bc, pow2(N)))
    _norm_kernel[(triton.cdiv(N, br),)](
        h, h_bias if h_bias is not None else h, res if res is not None else h, x_out if res is not None else h,
        weight if weight is not None else h, bias if bias is not None else h, alpha if dyt else h, y, N, C, float(eps),
        HAS_HB=h_bias is not None, HAS_RES=res is not None, DYT=dyt, GELU=act_gelu,
        BLOCK_R=br, BLOCK_C=bc, INTERP=INTERPRET, num_warps=4 if bc <= 1024 else 8,
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
