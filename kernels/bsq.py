"""Binary spherical quantizer, one pass per row of D <= 62 latents:

    bsq:      lats = x / max(||x||, eps)  ->  bit_i = lats_i > 0,  tok = sum bit_i 2^(D-1-i),
              code_i = +-1/sqrt(D)        (each output optional: normalise only, quantize only)
    code_proj: in_proj of the codes without materialising them: out = b + sum_i code_i W[:, i];
              from tokens, code_i = +-1/sqrt(D) is the token's bit i, so out is a signed sum
              of weight columns.

The code value is computed once on the host in the model dtype exactly as the reference
divides (so codes are bit-identical), and bits come from the stored (rounded) latents.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import TILE, check, check_device, launch_opts, out_or_new, pdl_wait, pow2



@functools.lru_cache(maxsize=None)
def code_value(D: int, dtype: torch.dtype) -> float:
    """1/sqrt(D) rounded to dtype, as the reference computes it (+1 in dtype / sqrt(D))."""
    return float(torch.ones((), dtype=dtype) / math.sqrt(D))


@triton.jit
def _bsq_kernel(x_ptr, lats_ptr, toks_ptr, codes_ptr, N, D, eps, code,
                NORMALIZE: tl.constexpr, QUANTIZE: tl.constexpr, WRITE_CODES: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.arange(0, BLOCK_D)
    im = i < D
    m = (r < N)[:, None] & im[None, :]
    p = r[:, None] * D + i[None, :]
    x = tl.load(x_ptr + p, mask=m, other=0.0)
    if NORMALIZE:
        xf = x.to(tl.float32)
        n = tl.sqrt(tl.sum(xf * xf, 1))
        x = (xf / tl.maximum(n, eps)[:, None]).to(lats_ptr.dtype.element_ty)
        tl.store(lats_ptr + p, x, mask=m)
    if QUANTIZE:
        bit = (x.to(tl.float32) > 0) & m
        shift = (D - 1 - i).to(tl.int64)
        tok = tl.sum(tl.where(bit, tl.full([BLOCK_R, BLOCK_D], 1, tl.int64) << shift[None, :], 0), 1)
        tl.store(toks_ptr + r, tok, mask=r < N)
        if WRITE_CODES:
            tl.store(codes_ptr + p, tl.where(bit, code, -code).to(codes_ptr.dtype.element_ty), mask=m)


@triton.jit
def _code_proj_kernel(src_ptr, w_ptr, b_ptr, out_ptr, N, O, code,
                      D: tl.constexpr, FROM_TOKENS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    rm = r < N
    om = o < O
    acc = tl.zeros([BLOCK_R, BLOCK_O], dtype=tl.float32)
    if FROM_TOKENS:
        tok = tl.load(src_ptr + r, mask=rm, other=0)
    for i in tl.static_range(D):
        if FROM_TOKENS:
            s = tl.where(((tok >> (D - 1 - i)) & 1) != 0, code, -code)
        else:
            s = tl.load(src_ptr + r * D + i, mask=rm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + o * D + i, mask=om, other=0.0).to(tl.float32)
        acc += s[:, None] * w[None, :]
    acc += tl.load(b_ptr + o, mask=om, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + r[:, None] * O + o[None, :], acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] & om[None, :])


def bsq(x: Tensor, normalize: bool = True, quantize: bool = True, codes: bool = True, eps: float = 1e-12):
    """Returns (lats or None, toks or None, codes or None); x (..., D) contiguous."""
    x = x.contiguous()
    D = x.shape[-1]
    N = x.numel() // max(D, 1)
    check(1 <= D <= 62, f"code dim must be 1..62, got {D}")
    check(normalize or quantize, "nothing to do")
    check_device(x)
    lead = x.shape[:-1]
    lats = torch.empty_like(x) if normalize else None
    toks = torch.empty(lead, dtype=torch.int64, device=x.device) if quantize else None
    cds = torch.empty_like(x) if (quantize and codes) else None
    bd = pow2(D)
    br = max(1, min(TILE // bd, pow2(N), 256))
    _bsq_kernel[(triton.cdiv(N, br),)](
        x, lats if normalize else x, toks if quantize else x, cds if cds is not None else x, N, D, float(eps),
        code_value(D, x.dtype), NORMALIZE=normalize, QUANTIZE=quantize, WRITE_CODES=cds is not None,
        BLOCK_R=br, BLOCK_D=bd, num_warps=4, **launch_opts(x),
    )
    return lats, toks, cds


def code_proj(src: Tensor, weight: Tensor, bias: Tensor, D: int | None = None, dtype: torch.dtype | None = None,
              out: Tensor | None = None) -> Tensor:
    """in_proj of codes (..., D) float, or of tokens (...) int with D and dtype given."""
    O = weight.shape[0]
    from_tokens = not src.is_floating_point()
    if from_tokens:
        check(D is not None and dtype is not None, "tokens need the code dim D and the model dtype")
    else:
        D, dtype = src.shape[-1], src.dtype
    check(tuple(weight.shape) == (O, D) and weight.is_contiguous() and bias.shape == (O,), f"in_proj weight must be contiguous ({O}, {D})")
    check(D <= 64, f"code dim at most 64, got {D}")
    src = src.contiguous()
    lead = src.shape if from_tokens else src.shape[:-1]
    N = src.numel() // (1 if from_tokens else D)
    check_device(src, weight, bias)
    out = out_or_new(out, (*lead, O), dtype, src.device)
    bo = min(pow2(O), 256)
    br = max(1, min(TILE // bo, pow2(N)))
    _code_proj_kernel[(triton.cdiv(N, br), triton.cdiv(O, bo))](
        src, weight, bias, out, N, O, code_value(D, dtype), D=D, FROM_TOKENS=from_tokens,
        BLOCK_R=br, BLOCK_O=bo, num_warps=4, **launch_opts(src),
    )
    return out


# --------------------------------------------------------------------------- reference
def bsq_quantize_ref(lats: Tensor) -> tuple[Tensor, Tensor]:
    """lats (..., D) -> tokens (...) int64 (first feature = MSB) and codes (..., D) = ±1/sqrt(D)."""
    D = lats.shape[-1]
    bits = lats > 0
    weights = 2 ** torch.arange(D - 1, -1, -1, device=lats.device, dtype=torch.int64)
    toks = (bits.long() * weights).sum(-1)
    codes = torch.where(bits, 1.0, -1.0).to(lats.dtype) / math.sqrt(D)
    return toks, codes


def bsq_codes_ref(toks: Tensor, D: int, dtype: torch.dtype) -> Tensor:
    """tokens (...) -> codes (..., D)."""
    # floor division by powers of two, not >>: ONNX exporters have no right shift of int64
    pows = 2 ** torch.arange(D - 1, -1, -1, device=toks.device, dtype=torch.int64)
    bits = torch.remainder(torch.div(toks.long().unsqueeze(-1), pows, rounding_mode="floor"), 2)
    return (bits.to(dtype) * 2 - 1) / math.sqrt(D)


def bsq_ref(x: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    lats = F.normalize(x, dim=-1, eps=eps)
    return (lats, *bsq_quantize_ref(lats))


def code_proj_ref(src: Tensor, weight: Tensor, bias: Tensor, D: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    codes = src if src.is_floating_point() else bsq_codes_ref(src, D, dtype)
    return F.linear(codes, weight, bias)
