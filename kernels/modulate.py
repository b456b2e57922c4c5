"""Focal modulation's elementwise step: out = q * (m + bias), m = context_proj(acc) without bias.

q is a strided view (the first C features of in_proj's output, row stride 2C+L+1); m is the
cuBLAS output and may be overwritten (`out=m`), so the step costs one read of q and m and one
write, and no allocation.
"""
from __future__ import annotations

import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import TILE, check, check_device, evenly_strided_rows, launch_opts, out_or_new, pdl_wait, pow2



@triton.jit
def _modulate_kernel(q_ptr, q_sr, m_ptr, b_ptr, out_ptr, N, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    msk = (r < N)[:, None] & cm[None, :]
    q = tl.load(q_ptr + r[:, None] * q_sr + c[None, :], mask=msk, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + r[:, None] * C + c[None, :], mask=msk, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(out_ptr + r[:, None] * C + c[None, :], (q * (m + b[None, :])).to(out_ptr.dtype.element_ty), mask=msk)


def modulate(q: Tensor, m: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """q (..., C) with unit channel stride and rows evenly strided; m (..., C) contiguous."""
    C = q.shape[-1]
    check(q.shape == m.shape and m.is_contiguous() and bias.numel() == C, f"q, m (..., {C}) and bias ({C},)")
    check(q.stride(-1) == 1, "q needs unit channel stride")
    N = m.numel() // max(C, 1)
    check(q.dim() >= 2, "q needs a row dimension")
    q = evenly_strided_rows(q)
    check_device(q, m, bias)
    out = m if out is m else out_or_new(out, m.shape, m.dtype, m.device)
    bc = min(pow2(C), 1024)
    br = max(1, min(TILE // bc, pow2(N)))
    _modulate_kernel[(triton.cdiv(N, br), triton.cdiv(C, bc))](q, q.stride(-2), m, bias, out, N, C, BLOCK_R=br, BLOCK_C=bc,
                                                                 num_warps=4, **launch_opts(q))
    return out


def modulate_ref(q: Tensor, acc: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """q * context_proj(acc); weight (C, C) of the 1x1 conv."""
    return q * F.linear(acc, weight, bias)
