"""Per-row error code of a pipeline step in one launch (the torch form is ~17 small kernels):

    1  the row's input audio has a NaN/Inf
    2  else: its audio goes beyond ±max_amp
    3  else: a checked output (latents, the step's product) has a NaN/Inf
    0  fine
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, check, check_device, pow2

ERR_NONFINITE_INPUT, ERR_OUT_OF_RANGE, ERR_NONFINITE_OUTPUT = 1, 2, 3


@triton.jit
def _row_flags(p, n, sr, row, BLOCK: tl.constexpr):
    """One row of n values at p + row * sr: (count of non-finite values, max |finite value|)."""
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    peak = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, n, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        m = k < n
        a = tl.abs(tl.load(p + row * sr + k, mask=m, other=0.0).to(tl.float32))
        fin = a < float("inf")  # false for Inf and NaN
        bad += tl.where(m & ~fin, 1, 0)
        peak = tl.maximum(peak, tl.where(fin, a, 0.0))
    return tl.sum(bad, 0), tl.max(peak, 0)


@triton.jit
def _status_kernel(a_ptr, a_n, a_sr, l_ptr, l_n, l_sr, o_ptr, o_n, o_sr, code_ptr, max_amp,
                   HAS_A: tl.constexpr, HAS_L: tl.constexpr, HAS_O: tl.constexpr, BLOCK: tl.constexpr,
                   ERR_INPUT: tl.constexpr, ERR_RANGE: tl.constexpr, ERR_OUTPUT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    code = 0
    if HAS_L:
        nb, _ = _row_flags(l_ptr, l_n, l_sr, row, BLOCK)
        code = tl.where(nb > 0, ERR_OUTPUT, code)
    if HAS_O:
        nb, _ = _row_flags(o_ptr, o_n, o_sr, row, BLOCK)
        code = tl.where(nb > 0, ERR_OUTPUT, code)
    if HAS_A:
        nb, peak = _row_flags(a_ptr, a_n, a_sr, row, BLOCK)
        code = tl.where(peak > max_amp, ERR_RANGE, code)
        code = tl.where(nb > 0, ERR_INPUT, code)
    tl.store(code_ptr + row, code)


def _as_rows(t: Tensor | None, B: int):
    if t is None:
        return None, 0, 0
    t = t.reshape(B, -1) if B else t.reshape(0, 0)
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, t.shape[1], t.stride(0)


def row_status(audio: Tensor | None, checked: list[Tensor], max_amp: float, rows: int) -> Tensor:
    """int32 (rows,) codes as above; audio (rows, N) or None, checked: up to two float tensors
    with `rows` leading rows."""
    check(len(checked) <= 2, "at most two checked outputs")
    ts = [audio, *checked]
    check_device(*[t for t in ts if t is not None])
    a, an, asr = _as_rows(audio, rows)
    l, ln, lsr = _as_rows(checked[0] if checked else None, rows)
    o, on, osr = _as_rows(checked[1] if len(checked) > 1 else None, rows)
    dev = next(t for t in ts if t is not None).device
    code = torch.empty(rows, dtype=torch.int32, device=dev)
    if rows == 0:
        return code
    dummy = code
    block = min(pow2(max(an, ln, on, 1)), 4096 if INTERPRET else 1024)
    _status_kernel[(rows,)](a if a is not None else dummy, an, asr, l if l is not None else dummy, ln, lsr,
                            o if o is not None else dummy, on, osr, code, float(max_amp),
                            HAS_A=a is not None, HAS_L=l is not None, HAS_O=o is not None, BLOCK=block,
                            ERR_INPUT=ERR_NONFINITE_INPUT, ERR_RANGE=ERR_OUT_OF_RANGE, ERR_OUTPUT=ERR_NONFINITE_OUTPUT,
                            num_warps=4)
    return code


def row_status_ref(audio: Tensor | None, checked: list[Tensor], max_amp: float, rows: int) -> Tensor:
    bad = torch.zeros(rows, dtype=torch.bool, device=(audio if audio is not None else checked[0]).device)
    for t in checked:
        bad = bad | ~torch.isfinite(t).flatten(1).all(1)
    code = torch.where(bad, ERR_NONFINITE_OUTPUT, 0).to(torch.int32)
    if audio is not None:
        code = torch.where(audio.abs().amax(1) > max_amp, ERR_OUT_OF_RANGE, code)
        code = torch.where(~torch.isfinite(audio).all(1), ERR_NONFINITE_INPUT, code)
    return code
