"""Per-row error code of a pipeline step in one launch (the torch form is ~17 small kernels):

    1  the row's input audio has a NaN/Inf
    2  else: its audio goes beyond ±max_amp
    3  else: a checked output (latents, the step's product) has a NaN/Inf
    0  fine

The same launch advances the stages' frame counts (`advances`): it runs after every kernel of
the step has read them, so each stage's `pos[idx] = start + n` costs no launch of its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, check, check_device, launch_opts, pdl_wait, pow2

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


MAX_ADVANCES = 4  # one per stage


@triton.jit
def _advance(pos_ptr, start_ptr, n, row, crow):
    tl.store(pos_ptr + crow, tl.load(start_ptr + row) + n)


@triton.jit
def _status_kernel(a_ptr, a_n, a_sr, l_ptr, l_n, l_sr, o_ptr, o_n, o_sr, code_ptr, max_amp, idx_ptr,
                   p0, s0, n0, p1, s1, n1, p2, s2, n2, p3, s3, n3,
                   HAS_A: tl.constexpr, HAS_L: tl.constexpr, HAS_O: tl.constexpr, BLOCK: tl.constexpr,
                   ERR_INPUT: tl.constexpr, ERR_RANGE: tl.constexpr, ERR_OUTPUT: tl.constexpr,
                   N_ADV: tl.constexpr, HAS_IDX: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    if N_ADV > 0:
        if HAS_IDX:
            crow = tl.load(idx_ptr + row)
        else:
            crow = row
        _advance(p0, s0, n0, row, crow)
        if N_ADV > 1:
            _advance(p1, s1, n1, row, crow)
        if N_ADV > 2:
            _advance(p2, s2, n2, row, crow)
        if N_ADV > 3:
            _advance(p3, s3, n3, row, crow)
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


def check_advances(advances, rows: int):
    """[(pos (S,) int64, start (rows,) int64, n frames)], one slot index (rows,) or None for
    them all (None: pos row b). Returns (advances, idx)."""
    advances = list(advances or [])
    check(len(advances) <= MAX_ADVANCES, f"at most {MAX_ADVANCES} advances")
    idx = advances[0][1] if advances else None
    for pos, i, start, n in advances:
        check(i is idx, "the advances share one slot index")
        check(pos.dtype == torch.long and start.dtype == torch.long and start.shape == (rows,) and pos.is_contiguous()
              and (i is not None or pos.shape[0] == rows), f"advance: pos (S,) and start ({rows},) int64")
    return advances, idx


def apply_advances_ref(advances) -> None:
    for pos, idx, start, n in advances:
        if idx is None:
            pos.copy_(start + n)
        else:
            pos.index_copy_(0, idx, start + n)


def row_status(audio: Tensor | None, checked: list[Tensor], max_amp: float, rows: int, advances=None) -> Tensor:
    """int32 (rows,) codes as above; audio (rows, N) or None, checked: up to two float tensors
    with `rows` leading rows. advances: [(pos, idx, start, n)], each pos[idx] = start + n (idx
    None: row b), done in the same launch."""
    check(len(checked) <= 2, "at most two checked outputs")
    advances, aidx = check_advances(advances, rows)
    ts = [audio, *checked]
    check_device(*[t for t in ts if t is not None], *[t for p, _, s_, _ in advances for t in (p, s_)])
    a, an, asr = _as_rows(audio, rows)
    l, ln, lsr = _as_rows(checked[0] if checked else None, rows)
    o, on, osr = _as_rows(checked[1] if len(checked) > 1 else None, rows)
    dev = next(t for t in ts if t is not None).device
    code = torch.empty(rows, dtype=torch.int32, device=dev)
    if rows == 0:
        return code
    dummy = code
    block = min(pow2(max(an, ln, on, 1)), 4096 if INTERPRET else 1024)
    adv = [a_ for p, _, s_, n in advances for a_ in (p, s_, int(n))]
    adv += [dummy, dummy, 0] * (MAX_ADVANCES - len(advances))
    _status_kernel[(rows,)](a if a is not None else dummy, an, asr, l if l is not None else dummy, ln, lsr,
                            o if o is not None else dummy, on, osr, code, float(max_amp),
                            aidx if aidx is not None else dummy, *adv,
                            HAS_A=a is not None, HAS_L=l is not None, HAS_O=o is not None, BLOCK=block,
                            ERR_INPUT=ERR_NONFINITE_INPUT, ERR_RANGE=ERR_OUT_OF_RANGE, ERR_OUTPUT=ERR_NONFINITE_OUTPUT,
                            N_ADV=len(advances), HAS_IDX=aidx is not None, num_warps=4,
                            **launch_opts(code))
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
