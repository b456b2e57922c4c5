"""Elementwise epilogue of a cuBLAS matmul, one pass over (N, C) rows:

    out = ACT(res + gamma * (h + bias))      every part optional

ACT: none, exact GELU (FFN / refiner / ConvNeXt hidden), clamp (WaveNeXt head: the frame's
480 samples are already the contiguous layout of the waveform), Snake (per-channel alpha);
"gelu_then_res" is res + GELU(gamma * (h + bias)) (WavLM's positional conv and its residual).
The matmul runs without bias so bias, scale, residual and activation cost one read and one
write; `out` may be `h` itself (each element is read before it is written, by one thread).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, TILE, check, check_device, gelu, launch_opts, out_or_new, pdl_wait, pow2, sin

ACTS = {"none": 0, "gelu": 1, "clamp": 2, "snake": 3, "gelu_then_res": 4}


@triton.jit
def apply_epilogue(x, r, c, rm, cm, C, b_ptr, res_ptr, gamma_ptr, alpha_ptr, mul_ptr, mul_sr, lo, hi,
                   HAS_BIAS: tl.constexpr, HAS_MUL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr,
                   ACT: tl.constexpr, INTERP: tl.constexpr):
    """ACT(res + gamma * mul * (x + bias)) of an fp32 tile x at rows r (int64) and channels c of
    (N, C) rows: res contiguous, mul with row stride mul_sr (focal modulation's q)."""
    m = rm[:, None] & cm[None, :]
    if HAS_BIAS:
        x += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_MUL:
        x = x * tl.load(mul_ptr + r[:, None] * mul_sr + c[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        x = x * tl.load(gamma_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_RES and ACT != 4:
        x += tl.load(res_ptr + r[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
    if ACT == 1 or ACT == 4:
        x = gelu(x, INTERP)
    elif ACT == 2:
        x = tl.minimum(tl.maximum(x, lo), hi)
    elif ACT == 3:
        a = tl.load(alpha_ptr + c, mask=cm, other=1.0).to(tl.float32)[None, :]
        s = sin(a * x, INTERP)
        x = x + s * s / (a + 1e-9)
    if HAS_RES and ACT == 4:
        x += tl.load(res_ptr + r[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
    return x


@triton.jit
def _epilogue_kernel(h_ptr, b_ptr, res_ptr, gamma_ptr, alpha_ptr, out_ptr, N, C, lo, hi,
                     HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_GAMMA: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm, cm = r < N, c < C
    m = rm[:, None] & cm[None, :]
    p = r[:, None] * C + c[None, :]
    x = tl.load(h_ptr + p, mask=m, other=0.0).to(tl.float32)
    x = apply_epilogue(x, r, c, rm, cm, C, b_ptr, res_ptr, gamma_ptr, alpha_ptr, h_ptr, 0, lo, hi,
                       HAS_BIAS, False, HAS_GAMMA, HAS_RES, ACT, INTERP)
    tl.store(out_ptr + p, x.to(out_ptr.dtype.element_ty), mask=m)


def check_epilogue(shape: tuple, act: str, bias, res, gamma, alpha):
    """The epilogue's arguments for an output of `shape` (..., C); returns res contiguous."""
    C = shape[-1]
    check(act in ACTS, f"act must be one of {list(ACTS)}, got {act!r}")
    for name, v in (("bias", bias), ("gamma", gamma), ("alpha", alpha)):
        if v is not None:
            check(v.numel() == C and v.is_contiguous(), f"{name} must hold {C} contiguous values, got {tuple(v.shape)}")
    check(act != "snake" or alpha is not None, "snake needs alpha")
    check(act != "gelu_then_res" or res is not None, "gelu_then_res needs res")
    if res is not None:
        check(tuple(res.shape) == tuple(shape), f"res must be {tuple(shape)}, got {tuple(res.shape)}")
        res = res.contiguous()
    return res


def epilogue(h: Tensor, bias: Tensor | None = None, act: str = "none", res: Tensor | None = None,
             gamma: Tensor | None = None, alpha: Tensor | None = None, lo: float = -1.0, hi: float = 1.0,
             out: Tensor | None = None) -> Tensor:
    """ACT(res + gamma * (h + bias)) over the last dim; h (..., C) contiguous."""
    check(h.is_contiguous(), "h must be contiguous (a matmul output)")
    C = h.shape[-1]
    N = h.numel() // max(C, 1)
    res = check_epilogue(tuple(h.shape), act, bias, res, gamma, alpha)
    check_device(h, *[v for v in (bias, res, gamma, alpha) if v is not None])
    out = h if out is h else out_or_new(out, h.shape, h.dtype, h.device)
    bc = min(pow2(C), 1024)
    br = max(1, min(TILE // bc, pow2(N)))
    _epilogue_kernel[(triton.cdiv(N, br), triton.cdiv(C, bc))](
        h, bias if bias is not None else h, res if res is not None else h, gamma if gamma is not None else h,
        alpha if alpha is not None else h, out, N, C, float(lo), float(hi),
        HAS_BIAS=bias is not None, HAS_RES=res is not None, HAS_GAMMA=gamma is not None, ACT=ACTS[act],
        BLOCK_R=br, BLOCK_C=bc, INTERP=INTERPRET, num_warps=4, **launch_opts(h),
    )
    return out


def epilogue_ref(h: Tensor, bias: Tensor | None = None, act: str = "none", res: Tensor | None = None,
                 gamma: Tensor | None = None, alpha: Tensor | None = None, lo: float = -1.0, hi: float = 1.0) -> Tensor:
    x = h if bias is None else h + bias
    if gamma is not None:
        x = x * gamma
    if res is not None and act != "gelu_then_res":
        x = res + x
    if act in ("gelu", "gelu_then_res"):
        x = F.gelu(x)
    elif act == "clamp":
        x = x.clamp(lo, hi)
    elif act == "snake":
        x = x + torch.sin(alpha * x).pow(2) / (alpha + 1e-9)
    if act == "gelu_then_res":  # the residual after the activation
        x = res + x
    return x
