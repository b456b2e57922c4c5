"""Focal context: every level of one focal-modulation layer in one launch.

    acc = sum_l gates[l] * y_l,   y_l = GELU(dwconv_l(y_{l-1})),  y_{-1} = ctx

Causal: levels (14, 18 taps) then the window conv (512 taps), each left-padded with its own
cache or, for a fresh stream or offline, with its first input frame repeated. A level's cache
is a ring (S, C, R) of its input frames, R = `ring_len(K)` >= K-1: frame f of a stream lives
in slot f mod R, so a step reads the K-1 frames before `start` (the stream's frame count) in
place and writes only its T new frames, never shifting the other R-T. Frames before a
stream's first are its first (the replicate rule): frame 0 on a stream's first step, ring
slot 0 while later steps still reach back before it (R >= K-1 keeps it there that long). Non-causal: "same"
zero padding for the two levels, then GELU(mean over time of y_1) as the last level.

One program owns (row, channel block) and walks time in tiles: level l of a tile reads level
l-1's output of this and earlier tiles, so it goes through a float32 scratch (B, C, T),
re-read within a few tiles of being written (L2 hits). Streaming steps (T <= 4 frames) read
each ring once, in slot order, as 16-byte rows: output t's tap for slot r is a function of
(r - start) mod R, so the weights are gathered (cached, shared by every row) instead of the
ring. At the end the program writes its rows' new frames into the rings (all reads of them
are done). With many rows (`WINDOW_ROWS`) a step is two other launches: `_window_rows_kernel`,
the window level's ring taps as a GEMM with the streams on the rows (a channel's weights serve
every stream on the tensor cores instead of being gathered once per tap and stream), then
`_focal_rows_kernel`, the rest with one (row, channel) a lane and the 4 frames in registers
(levels 0 and 1 read in time order, each tap's weight loaded once: ~35 SASS instructions a
(row, channel) against ~425 for the fused kernel's per-row tile).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import INTERPRET, TILE, check, check_device, gelu, grouped_conv1d, launch_opts, out_or_new, pdl_wait, pow2, ring_slots

STREAM_FRAMES = 4  # steps up to this many frames take the slot-order ring read
# from this many rows a step's window level reads its rings as a GEMM with the streams on the
# rows (`_window_rows_kernel`, one more launch); fewer keep it in the one fused launch
WINDOW_ROWS = _common.env_int("FASTFOCAL_FOCAL_WINDOW_ROWS", 64)
# streaming tile override "channels,slots,warps", for device sweeps (one process per tile)
_TILE_OVERRIDE = os.environ.get("FASTFOCAL_FOCAL_TILE")
_ROWS_TILE_OVERRIDE = os.environ.get("FASTFOCAL_FOCAL_ROWS_TILE")
_LONG_TILE_OVERRIDE = os.environ.get("FASTFOCAL_FOCAL_LONG_TILE")  # "tiles,frames,taps,warps"


def ring_len(k: int) -> int:
    """Slots of a K-tap causal conv's cache ring: K-1 rounded up to a power of two (slot
    arithmetic is a mask; 512-frame rows stay 16-byte aligned)."""
    return pow2(k - 1)


@triton.jit
def _taps(new_ptr, new_st, new_sc, ring_ptr, w_ptr, offs_c, cmask, t0, T, start,
          K: tl.constexpr, K_LO: tl.constexpr, PADL: tl.constexpr, R: tl.constexpr,
          CAUSAL: tl.constexpr, HAS_CACHE: tl.constexpr, NEW_ONLY: tl.constexpr,
          BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum over taps K_LO..K-1 of w * input frame tau = t + k - PADL, for output frames
    t0..t0+BLOCK_T of one channel block (no bias).

    Causal: step frame tau is stream frame g = max(start + tau, 0) (frames before a stream's
    first are its first: the replicate rule), a new frame (g - start) when g >= start, else
    ring slot g mod R (without a ring, nothing). NEW_ONLY: the new frames alone (tau >= 0).
    Non-causal pads with zeros on both sides.
    """
    t = t0 + tl.arange(0, BLOCK_T)
    c3 = offs_c[:, None, None]
    ok3 = cmask[:, None, None] & (t < T)[None, :, None]
    acc = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    for k0 in range(K_LO, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        w = tl.load(w_ptr + offs_c[:, None] * K + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        tau = t[None, :, None] + kk[None, None, :] - PADL
        ok = ok3 & kmask[None, None, :]
        if CAUSAL:
            g = tl.maximum(start + tau, 0)
            use_new = g >= start
            if NEW_ONLY:
                use_new = use_new & (tau >= 0)
            x = tl.load(new_ptr + (g - start) * new_st + c3 * new_sc, mask=ok & use_new, other=0.0).to(tl.float32)
            if HAS_CACHE:
                xc = tl.load(ring_ptr + c3 * R + (g & (R - 1)), mask=ok & (~use_new), other=0.0)
                x = x + xc.to(tl.float32)
        else:
            inr = (tau >= 0) & (tau < T)
            x = tl.load(new_ptr + tau * new_st + c3 * new_sc, mask=ok & inr, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32)[:, None, :] * x, axis=2)
    return acc


@triton.jit
def _ring_taps(ring_ptr, w_ptr, offs_c, cmask, start, first,
               K: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """The taps on frames before the step for outputs 0..BLOCK_T-1, reading the ring once in
    slot order (a whole window per iteration: many loads in flight). Slot r holds frame
    f = start - R + d, d = (r - start) mod R; its tap for output t is k = d - (R - K + 1) - t.
    Frames f < 0 are the stream's first (`first`, (BLOCK_C,)), so those slots are not used."""
    out = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    tc = tl.arange(0, BLOCK_T)[None, :]
    c2 = offs_c[:, None]
    rp = ring_ptr + c2 * R + tl.arange(0, BLOCK_R)[None, :]
    # whole 16-byte rows (a mask varying along r would split them): select after the load;
    # the next slots' load is issued before this iteration's math (two in flight)
    nxt = tl.load(rp, mask=cmask[:, None], other=0.0)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        x = nxt.to(tl.float32)
        nxt = tl.load(rp + (r0 + BLOCK_R), mask=cmask[:, None] & (r0 + BLOCK_R < R), other=0.0)
        d = (r - start) & (R - 1)
        k = d - (R - K + 1)
        m = cmask[:, None] & (k >= 0)[None, :]
        x = tl.where(m, tl.where((d >= R - start)[None, :], x, first[:, None]), 0.0)
        for t in tl.static_range(BLOCK_T):
            w = tl.load(w_ptr + c2 * K + (k - t)[None, :], mask=m & (k >= t)[None, :], other=0.0).to(tl.float32)
            out = tl.where(tc == t, out + tl.sum(x * w, axis=1)[:, None], out)
    return out


@triton.jit
def _window_rows_kernel(ring_ptr, idx_ptr, start_ptr, w_ptr, p_ptr, B, C,
                        K: tl.constexpr, R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,
                        PREC: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr):
    """P[b, c, t] (B, C, 4) float32: the window level's taps on the frames before a step (what
    `_ring_taps` gives) for BLOCK_S rows of one channel at once, as a GEMM with the streams on
    the rows, so the channel's weights serve them all: out[s, t] = sum_j X[s, j] w[j - t], X[s, j]
    the stream's window frame j (frame start - (K-1) + j, j < K-1), the weights a banded
    (K-1) x 4 matrix built from the channel's row. Frames before a stream's first are its first
    (ring slot 0). A stream's first step (start 0) has no frames before it: every one is the
    step's first, so its row gets the sums of the taps before the step's frames, which the rows
    kernel scales by that frame (the replicate rule)."""
    pdl_wait(PDL)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1)
    sm = s < B
    slot = tl.load(idx_ptr + s, mask=sm, other=0).to(tl.int64)
    start = tl.load(start_ptr + s, mask=sm, other=0).to(tl.int32)
    row = ring_ptr + (slot * C + c) * R
    first = start - (K - 1)
    tt = tl.arange(0, 16)  # outputs 0..3, padded to the dot's 16 columns
    acc = tl.zeros([BLOCK_S, 16], dtype=tl.float32)
    for j0 in range(0, K - 1, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        f = first[:, None] + j[None, :]
        x = tl.load(row[:, None] + (tl.maximum(f, 0) & (R - 1)), mask=sm[:, None] & (j < K - 1)[None, :], other=0.0)
        k = j[:, None] - tt[None, :]
        v = tl.load(w_ptr + c * K + k, mask=(k >= 0) & (tt < 4)[None, :] & (j < K - 1)[:, None], other=0.0)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), v.to(tl.float32), input_precision=PREC)
        else:
            acc += tl.dot(x, v.to(x.dtype), input_precision=PREC)
    fresh = sm & (start == 0)
    if tl.sum(fresh.to(tl.int32), axis=0) > 0:  # rare: once per joining stream
        tot = tl.zeros([16], dtype=tl.float32)
        for k0 in range(0, K - 1, 128):
            k = k0 + tl.arange(0, 128)
            wk = tl.load(w_ptr + c * K + k, mask=k < K - 1, other=0.0).to(tl.float32)
            # tap k is on a frame before the step for outputs t <= K-2-k
            tot += tl.sum(tl.where(k[:, None] <= K - 2 - tt[None, :], wk[:, None], 0.0), axis=0)
        acc = tl.where(fresh[:, None], tot[None, :], acc)
    tl.store(p_ptr + (s[:, None] * C + c) * 4 + tt[None, :], acc, mask=sm[:, None] & (tt < 4)[None, :])


@triton.jit
def _level(new_ptr, new_st, new_sc, ring_ptr, w_ptr, b_ptr, offs_c, cmask, t0, T, start,
           K: tl.constexpr, R: tl.constexpr, HAS_CACHE: tl.constexpr, STREAM: tl.constexpr,
           BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
           INTERP: tl.constexpr):
    """GELU(causal depthwise conv + bias) of one level for output frames t0..t0+BLOCK_T."""
    if STREAM:  # new frames: taps K-BLOCK_T.. only; earlier frames: the ring in slot order
        # the stream's first frame: new frame 0 on its first step, else ring slot 0 (kept
        # while any step still reads frames before it, since R >= K-1)
        sc = offs_c * 0 + start  # (a vector mask: the interpreter refuses scalar ones)
        f_new = tl.load(new_ptr + offs_c * new_sc, mask=cmask & (sc == 0), other=0.0).to(tl.float32)
        f_ring = tl.load(ring_ptr + offs_c * R, mask=cmask & (sc > 0) & (sc < K - 1), other=0.0).to(tl.float32)
        acc = _taps(new_ptr, new_st, new_sc, ring_ptr, w_ptr, offs_c, cmask, t0, T, start,
                    K, max(K - BLOCK_T, 0), K - 1, R, True, False, True, BLOCK_C, BLOCK_T, BLOCK_K)
        acc += _ring_taps(ring_ptr, w_ptr, offs_c, cmask, start, f_new + f_ring, K, R, BLOCK_C, BLOCK_T, BLOCK_R)
    else:
        acc = _taps(new_ptr, new_st, new_sc, ring_ptr, w_ptr, offs_c, cmask, t0, T, start,
                    K, 0, K - 1, R, True, HAS_CACHE, False, BLOCK_C, BLOCK_T, BLOCK_K)
    bias = tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    return gelu(acc + bias[:, None], INTERP)


@triton.jit
def _ring_write(ring_ptr, new_ptr, new_st, new_sc, offs_c, cmask, T, start,
                R: tl.constexpr, BLOCK_U: tl.constexpr):
    """The step's new frames (the newest R of them) into their slots, frame f at f mod R."""
    c2 = offs_c[:, None]
    for u0 in range(tl.maximum(T - R, 0), T, BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)
        m = cmask[:, None] & (u < T)[None, :]
        v = tl.load(new_ptr + u[None, :] * new_st + c2 * new_sc, mask=m, other=0.0)
        tl.store(ring_ptr + c2 * R + ((start + u) & (R - 1))[None, :], v.to(ring_ptr.dtype.element_ty), mask=m)


@triton.jit
def _focal_causal_kernel(
    ctx_ptr, ctx_sb, ctx_st, g_ptr, g_sb, g_st,
    w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    c0_ptr, c1_ptr, c2_ptr, idx_ptr, start_ptr,
    s0_ptr, s1_ptr, out_ptr, T, C,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
    HAS_CACHE: tl.constexpr, STREAM: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_U: tl.constexpr, INTERP: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    if HAS_CACHE:
        slot = tl.load(idx_ptr + b).to(tl.int64)
        start = tl.load(start_ptr + b).to(tl.int32)
    else:  # offline: a fresh stream
        slot = b * 0
        start = 0
    c0 = c0_ptr + slot * C * R0
    c1 = c1_ptr + slot * C * R1
    c2 = c2_ptr + slot * C * R2
    ctx = ctx_ptr + b * ctx_sb
    s0 = s0_ptr + b * C * T
    s1 = s1_ptr + b * C * T
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m2 = cmask[:, None] & (t < T)[None, :]
        sp = offs_c[:, None] * T + t[None, :]
        y0 = _level(ctx, ctx_st, 1, c0, w0_ptr, b0_ptr, offs_c, cmask, t0, T, start,
                    K0, R0, HAS_CACHE, STREAM, BLOCK_C, BLOCK_T, BK0, min(R0, BLOCK_R), INTERP)
        tl.store(s0 + sp, y0, mask=m2)
        tl.debug_barrier()
        y1 = _level(s0, 1, T, c1, w1_ptr, b1_ptr, offs_c, cmask, t0, T, start,
                    K1, R1, HAS_CACHE, STREAM, BLOCK_C, BLOCK_T, BK1, min(R1, BLOCK_R), INTERP)
        tl.store(s1 + sp, y1, mask=m2)
        tl.debug_barrier()
        y2 = _level(s1, 1, T, c2, w2_ptr, b2_ptr, offs_c, cmask, t0, T, start,
                    K2, R2, HAS_CACHE, STREAM, BLOCK_C, BLOCK_T, BK2, min(R2, BLOCK_R), INTERP)
        gp = g_ptr + b * g_sb + t * g_st
        tm = t < T
        g0 = tl.load(gp, mask=tm, other=0.0).to(tl.float32)[None, :]
        g1 = tl.load(gp + 1, mask=tm, other=0.0).to(tl.float32)[None, :]
        g2 = tl.load(gp + 2, mask=tm, other=0.0).to(tl.float32)[None, :]
        acc = y0 * g0 + y1 * g1 + y2 * g2
        tl.store(out_ptr + b * T * C + t[None, :] * C + offs_c[:, None], acc.to(out_ptr.dtype.element_ty), mask=m2)
    if HAS_CACHE:
        tl.debug_barrier()  # every read of this program's ring rows is done
        _ring_write(c0, ctx, ctx_st, 1, offs_c, cmask, T, start, R0, BLOCK_U)
        _ring_write(c1, s0, 1, T, offs_c, cmask, T, start, R1, BLOCK_U)
        _ring_write(c2, s1, 1, T, offs_c, cmask, T, start, R2, BLOCK_U)


@triton.jit
def _rows_conv(ring_ptr, row, start, m, x0, x1, x2, x3, w_ptr, offs_c, cmask,
               K: tl.constexpr, R: tl.constexpr, RING: tl.constexpr):
    """A causal conv's sums (no bias) at a step's 4 frames for a (rows x channels) tile, all
    unrolled: the frames in time order, the K-1 before the step gathered from the ring (fresh
    rows: the new frame 0; without RING: left out, the caller has them) and then x0..x3, through
    a shift register of the last 4, so each tap's weight is loaded once for the 4 outputs."""
    fresh = (start == 0)[:, None]
    zero = x0 * 0.0
    a0, a1, a2, a3 = zero, zero, zero, zero
    p0, p1, p2 = zero, zero, zero  # frames j-3, j-2, j-1
    J0: tl.constexpr = 0 if RING else K - 4
    for j in tl.static_range(J0, K + 3):
        if j < K - 1:
            if RING:
                f = tl.maximum(start - (K - 1) + j, 0)  # frames before a stream's first are its first
                xr = tl.load(ring_ptr + row + (f & (R - 1))[:, None], mask=m & ~fresh, other=0.0)
                xj = tl.where(fresh, x0, xr.to(tl.float32))
            else:
                xj = zero
        elif j == K - 1:
            xj = x0
        elif j == K:
            xj = x1
        elif j == K + 1:
            xj = x2
        else:
            xj = x3
        if j >= J0 + 3:  # tap j-3 for outputs 0..3 (frames j-3..j)
            w = tl.load(w_ptr + offs_c * K + (j - 3), mask=cmask, other=0.0).to(tl.float32)[None, :]
            a0 += w * p0
            a1 += w * p1
            a2 += w * p2
            a3 += w * xj
        p0, p1, p2 = p1, p2, xj
    return a0, a1, a2, a3


@triton.jit
def _rows_out(out_ptr, g_ptr, g_sb, g_st, s, offs_c, sm, m, n, T, C, y0, y1, y2, t: tl.constexpr):
    """Output frame t: sum of the levels weighted by their gates (frames past T not stored)."""
    tm = sm & (n > t)
    gp = g_ptr + s * g_sb + t * g_st
    g0 = tl.load(gp, mask=tm, other=0.0).to(tl.float32)[:, None]
    g1 = tl.load(gp + 1, mask=tm, other=0.0).to(tl.float32)[:, None]
    g2 = tl.load(gp + 2, mask=tm, other=0.0).to(tl.float32)[:, None]
    acc = y0 * g0 + y1 * g1 + y2 * g2
    tl.store(out_ptr + (s[:, None] * T + t) * C + offs_c[None, :], acc.to(out_ptr.dtype.element_ty), mask=m & tm[:, None])


@triton.jit
def _rows_write(ring_ptr, row, start, m, n, x, u: tl.constexpr, R: tl.constexpr):
    """Frame u of the step (if u < n, the step's frames) into its ring slot, (start + u) mod R."""
    tl.store(ring_ptr + row + ((start + u) & (R - 1))[:, None], x.to(ring_ptr.dtype.element_ty), mask=m & (n > u)[:, None])


@triton.jit
def _rows_level(ring_ptr, row, start, m, n, x0, x1, x2, x3, w_ptr, b_ptr, offs_c, cmask,
                K: tl.constexpr, R: tl.constexpr, INTERP: tl.constexpr):
    """GELU(conv + bias) of a level with its window in the ring, at the step's 4 frames; then
    the level's input frames x0..x3 into the ring."""
    a0, a1, a2, a3 = _rows_conv(ring_ptr, row, start, m, x0, x1, x2, x3, w_ptr, offs_c, cmask, K, R, True)
    bias = tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y0, y1, y2, y3 = gelu(a0 + bias, INTERP), gelu(a1 + bias, INTERP), gelu(a2 + bias, INTERP), gelu(a3 + bias, INTERP)
    tl.debug_barrier()  # the level's ring reads are done
    _rows_write(ring_ptr, row, start, m, n, x0, 0, R)
    _rows_write(ring_ptr, row, start, m, n, x1, 1, R)
    _rows_write(ring_ptr, row, start, m, n, x2, 2, R)
    _rows_write(ring_ptr, row, start, m, n, x3, 3, R)
    return y0, y1, y2, y3


@triton.jit
def _focal_rows_kernel(
    ctx_ptr, ctx_sb, ctx_st, g_ptr, g_sb, g_st,
    w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    c0_ptr, c1_ptr, c2_ptr, idx_ptr, start_ptr, pre_ptr, out_ptr, B, T, C,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
):
    """A many-row streaming step (T <= 4) after `_window_rows_kernel`: each program owns
    (BLOCK_S rows, BLOCK_C channels), one (row, channel) a lane, and keeps the levels' 4 frames
    in registers (no scratch): levels 0 and 1 read their windows from the rings in time order,
    the window level takes its ring taps from P (fresh rows: P times their first frame) and adds
    the taps on the step's frames. Channels are the fast axis, so ctx, gates and out move as
    rows; every tap's weight is one load for the tile's rows and 4 outputs."""
    pdl_wait(PDL)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    sm = s < B
    cmask = offs_c < C
    m = sm[:, None] & cmask[None, :]
    slot = tl.load(idx_ptr + s, mask=sm, other=0).to(tl.int64)
    start = tl.load(start_ptr + s, mask=sm, other=0).to(tl.int32)
    chan = slot[:, None] * C + offs_c[None, :]
    s64 = s.to(tl.int64)
    xp = ctx_ptr + s64[:, None] * ctx_sb + offs_c[None, :]
    x0 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    n = s * 0 + T  # frames this step, as a vector (the interpreter refuses scalar masks)
    x1 = tl.load(xp + ctx_st, mask=m & (n > 1)[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(xp + 2 * ctx_st, mask=m & (n > 2)[:, None], other=0.0).to(tl.float32)
    x3 = tl.load(xp + 3 * ctx_st, mask=m & (n > 3)[:, None], other=0.0).to(tl.float32)

    y00, y01, y02, y03 = _rows_level(c0_ptr, chan * R0, start, m, n, x0, x1, x2, x3, w0_ptr, b0_ptr, offs_c, cmask,
                                     K0, R0, INTERP)
    y10, y11, y12, y13 = _rows_level(c1_ptr, chan * R1, start, m, n, y00, y01, y02, y03, w1_ptr, b1_ptr, offs_c, cmask,
                                     K1, R1, INTERP)

    # window level: its ring taps from P ((B, C, 4) float32), then the taps on y1's new frames
    r2 = chan * R2
    a0, a1, a2, a3 = _rows_conv(c2_ptr, r2, start, m, y10, y11, y12, y13, w2_ptr, offs_c, cmask, K2, R2, False)
    pp = pre_ptr + (s64[:, None] * C + offs_c[None, :]) * 4
    p0 = tl.load(pp, mask=m, other=0.0)
    p1 = tl.load(pp + 1, mask=m, other=0.0)
    p2 = tl.load(pp + 2, mask=m, other=0.0)
    p3 = tl.load(pp + 3, mask=m, other=0.0)
    scale = tl.where((start == 0)[:, None], y10, 1.0)  # a stream's first step: P holds tap sums (see above)
    p0, p1, p2, p3 = scale * p0, scale * p1, scale * p2, scale * p3
    bias = tl.load(b2_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y20 = gelu(a0 + bias + p0, INTERP)
    y21 = gelu(a1 + bias + p1, INTERP)
    y22 = gelu(a2 + bias + p2, INTERP)
    y23 = gelu(a3 + bias + p3, INTERP)
    _rows_write(c2_ptr, r2, start, m, n, y10, 0, R2)
    _rows_write(c2_ptr, r2, start, m, n, y11, 1, R2)
    _rows_write(c2_ptr, r2, start, m, n, y12, 2, R2)
    _rows_write(c2_ptr, r2, start, m, n, y13, 3, R2)

    _rows_out(out_ptr, g_ptr, g_sb, g_st, s64, offs_c, sm, m, n, T, C, y00, y10, y20, 0)
    _rows_out(out_ptr, g_ptr, g_sb, g_st, s64, offs_c, sm, m, n, T, C, y01, y11, y21, 1)
    _rows_out(out_ptr, g_ptr, g_sb, g_st, s64, offs_c, sm, m, n, T, C, y02, y12, y22, 2)
    _rows_out(out_ptr, g_ptr, g_sb, g_st, s64, offs_c, sm, m, n, T, C, y03, y13, y23, 3)


@triton.jit
def _level_long_kernel(x_ptr, ring_ptr, idx_ptr, start_ptr, w_ptr, b_ptr, g_ptr, g_sb, g_st, acc_ptr, y_ptr,
                        T, C, n_tiles, rows,
                        K: tl.constexpr, R: tl.constexpr, HAS_CACHE: tl.constexpr,
                        LEVEL: tl.constexpr, WRITE_Y: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_J: tl.constexpr,
                        PREC: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    """One level of a long causal run and its gate term, y = GELU(conv(x) + b), acc += y * g[..., LEVEL]
    (level 0: acc =; WRITE_Y: y stored for the next level), for BLOCK_M tiles of BLOCK_U output
    frames (of any rows) and one channel, as a tensor-core GEMM: a tile's outputs are out[u] = sum_j X[j] V[j, u] over its K-1+BLOCK_U input frames,
    V[j, u] = w[j - u] a Toeplitz band built from the channel's weight row, so the row serves
    every tile. x, acc, y (B, C, T); frames before the run: the ring (frame f in slot f mod R),
    before a stream's first its first (a fresh row's: x's frame 0)."""
    pdl_wait(PDL)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1)
    rm = r < rows
    b = (r // n_tiles).to(tl.int64)
    t0 = (r % n_tiles) * BLOCK_U
    if HAS_CACHE:
        slot = tl.load(idx_ptr + b, mask=rm, other=0).to(tl.int64)
        start = tl.load(start_ptr + b, mask=rm, other=0).to(tl.int32)
    else:
        slot = b * 0
        start = t0 * 0
    xrow = x_ptr + (b * C + c) * T
    first = tl.load(xrow, mask=rm, other=0.0)
    uu = tl.arange(0, BLOCK_U)
    lo = tl.min(tl.where(rm, t0, 1 << 30), axis=0)  # the program's earliest tile
    acc = tl.zeros([BLOCK_M, BLOCK_U], dtype=tl.float32)
    for j0 in range(0, K - 1 + BLOCK_U, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        f = t0[:, None] - (K - 1) + j[None, :]  # frame of the run
        before = f < 0
        x = tl.load(xrow[:, None] + f, mask=rm[:, None] & ~before & (f < T), other=0.0)
        if lo - (K - 1) + j0 < 0:  # frames before the run: only the first K-1 of each row
            fresh = before & (start == 0)[:, None]
            x = tl.where(fresh, first[:, None], x)
            if HAS_CACHE:
                g = tl.maximum(start[:, None] + f, 0)  # stream frame; before its first: its first
                xr = tl.load(ring_ptr + (slot * C + c)[:, None] * R + (g & (R - 1)),
                             mask=rm[:, None] & before & ~fresh, other=0.0)
                x = x + xr
        k = j[:, None] - uu[None, :]
        v = tl.load(w_ptr + c * K + k, mask=(k >= 0) & (k < K), other=0.0)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), v.to(tl.float32), input_precision=PREC)
        else:
            acc += tl.dot(x, v.to(x.dtype), input_precision=PREC)
    bias = tl.load(b_ptr + c).to(tl.float32)
    y = gelu(acc + bias, INTERP)
    t = t0[:, None] + uu[None, :]
    tm = rm[:, None] & (t < T)
    gl = tl.load(g_ptr + b[:, None] * g_sb + t * g_st + LEVEL, mask=tm, other=0.0).to(tl.float32)
    off = (b * C + c)[:, None] * T + t
    if WRITE_Y:
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=tm)
    if LEVEL == 0:
        a = y * gl
    else:
        a = tl.load(acc_ptr + off, mask=tm, other=0.0).to(tl.float32) + y * gl
    tl.store(acc_ptr + off, a.to(acc_ptr.dtype.element_ty), mask=tm)


@triton.jit
def _same_gelu(x_ptr, x_st, x_sc, w_ptr, b_ptr, offs_c, cmask, t0, T,
               K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    acc = _taps(x_ptr, x_st, x_sc, x_ptr, w_ptr, offs_c, cmask, t0, T, 0,
                K, 0, (K - 1) // 2, 1, False, False, False, BLOCK_C, BLOCK_T, BLOCK_K)
    bias = tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    return gelu(acc + bias[:, None], INTERP)


@triton.jit
def _focal_same_kernel(
    ctx_ptr, ctx_sb, ctx_st, g_ptr, g_sb, g_st,
    w0_ptr, b0_ptr, w1_ptr, b1_ptr, s0_ptr, s1_ptr, out_ptr, T, C,
    K0: tl.constexpr, K1: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    BK0: tl.constexpr, BK1: tl.constexpr, INTERP: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    ctx = ctx_ptr + b * ctx_sb
    s0 = s0_ptr + b * C * T
    s1 = s1_ptr + b * C * T
    # level 1 looks K1//2 frames ahead, so level 0 must be complete first
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        y0 = _same_gelu(ctx, ctx_st, 1, w0_ptr, b0_ptr, offs_c, cmask, t0, T, K0, BLOCK_C, BLOCK_T, BK0, INTERP)
        tl.store(s0 + offs_c[:, None] * T + t[None, :], y0, mask=cmask[:, None] & (t < T)[None, :])
    tl.debug_barrier()
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m2 = cmask[:, None] & (t < T)[None, :]
        y1 = _same_gelu(s0, 1, T, w1_ptr, b1_ptr, offs_c, cmask, t0, T, K1, BLOCK_C, BLOCK_T, BK1, INTERP)
        tl.store(s1 + offs_c[:, None] * T + t[None, :], y1, mask=m2)
        total += tl.sum(tl.where(m2, y1, 0.0), axis=1)
    glob = gelu(total / T, INTERP)[:, None]
    tl.debug_barrier()
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        m2 = cmask[:, None] & tm[None, :]
        sp = offs_c[:, None] * T + t[None, :]
        y0 = tl.load(s0 + sp, mask=m2, other=0.0)
        y1 = tl.load(s1 + sp, mask=m2, other=0.0)
        gp = g_ptr + b * g_sb + t * g_st
        g0 = tl.load(gp, mask=tm, other=0.0).to(tl.float32)[None, :]
        g1 = tl.load(gp + 1, mask=tm, other=0.0).to(tl.float32)[None, :]
        g2 = tl.load(gp + 2, mask=tm, other=0.0).to(tl.float32)[None, :]
        acc = y0 * g0 + y1 * g1 + glob * g2
        tl.store(out_ptr + b * T * C + t[None, :] * C + offs_c[:, None], acc.to(out_ptr.dtype.element_ty), mask=m2)


def _blocks(T: int, C: int, ks: list[int], dtype: torch.dtype = torch.bfloat16):
    """(BLOCK_C, BLOCK_T, taps per iteration, ring slots per iteration, warps).

    Longer runs: the (channels x frames x taps) product of one iteration is kept at 1024
    elements over 8 warps; ptxas (sm_90) then needs no spills (4096 over 4 warps took 255
    registers). Streaming steps: the window ring read as 16-byte loads, two iterations' loads
    in flight, the taps on the new frames one block of T; the tile chosen by ptxas's register
    and SASS instruction counts (`tests/kernels/sm90_compile.py --loops`), not yet timed on a
    GPU. FASTFOCAL_FOCAL_TILE="channels,slots,warps" overrides a streaming step's tile (for
    sweeps on the device)."""
    block_t = min(pow2(T), 32)
    block_c, block_r, warps = min(pow2(C), 128 if _common.INTERP_TILES else 16), 128, 8
    if T <= STREAM_FRAMES and not _common.INTERP_TILES:
        # 16-bit: 16 channels x 64 slots, 107 registers (4 programs an SM) and ~1,070 SASS
        # instructions a channel, where 8 x 128 took 127 and ~1,550 (the per-program work outside
        # the window loop, amortised over twice the channels); fp32: 16 x 64 needs 229 registers
        block_c, block_r, warps = (8, 128, 4) if dtype == torch.float32 else (16, 64, 4)
        if _TILE_OVERRIDE:
            block_c, block_r, warps = (int(v) for v in _TILE_OVERRIDE.split(","))
    if T <= STREAM_FRAMES:  # a step's taps on its new frames are the last T of each level: one block of T
        return block_c, block_t, [min(block_t, pow2(k)) for k in ks], block_r, warps
    budget = max(1, (TILE if _common.INTERP_TILES else 1024) // (block_c * block_t))
    return block_c, block_t, [min(pow2(k), budget) for k in ks], block_r, warps


def _rows_tile(B: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, warps) of `_focal_rows_kernel`; FASTFOCAL_FOCAL_ROWS_TILE="rows,channels,warps"
    overrides it (device sweeps)."""
    if _common.INTERP_TILES:  # the interpreter pays per op: whole tiles
        return min(pow2(B), 16), min(pow2(C), 256), 4
    if _ROWS_TILE_OVERRIDE:
        bs, bc, w = (int(v) for v in _ROWS_TILE_OVERRIDE.split(","))
        return bs, bc, w
    # 2 (row, channel) pairs a lane: 110 registers, ~35 SASS instructions a pair (sm_90, bf16);
    # 8 x 64 holds 4 a lane and spills at 255
    return 4, 64, 4


def _window_rows(ring: Tensor, idx: Tensor, start: Tensor, w: Tensor, R: int, C: int) -> Tensor:
    """The window level's ring taps of a streaming step for every row, (B, C, 4) float32
    (`_window_rows_kernel`)."""
    B, K = idx.shape[0], w.shape[-1]
    pre = torch.empty(B, C, 4, dtype=torch.float32, device=ring.device)
    bs, bj = (16, min(pow2(K - 1), 512)) if _common.INTERP_TILES else (64, 64)  # the interpreter pays per op: one trip
    f32 = ring.dtype == torch.float32 or INTERPRET  # the interpreter's bf16 dot is broken
    _window_rows_kernel[(triton.cdiv(B, bs), C)](
        ring, idx, start, w, pre, B, C, K=K, R=R, BLOCK_S=bs, BLOCK_J=bj,
        PREC=_common.dot_precision(ring.dtype), DOT_F32=f32, num_warps=4, **launch_opts(ring),
    )
    return pre


def check_rings(caches: list[Tensor], ks: list[int], C: int) -> None:
    for c, k in zip(caches, ks):
        check(c.dim() == 3 and tuple(c.shape[1:]) == (C, ring_len(k)) and c.is_contiguous(),
              f"cache must be a contiguous ring (S, {C}, {ring_len(k)}) for {k} taps, got {tuple(c.shape)}")


def _check_args(ctx, gates, weights, biases, causal, caches, idx, start) -> list[int]:
    """The launchers' input checks; returns the levels' tap counts."""
    B, T, C = ctx.shape
    n = 3 if causal else 2
    check(len(weights) == n and len(biases) == n, f"{'causal' if causal else 'non-causal'} focal context takes {n} conv levels, got {len(weights)}")
    check(T >= 1, "focal_context needs at least one frame")
    check(ctx.stride(2) == 1 and gates.stride(2) == 1, "ctx and gates need unit channel stride")
    check(tuple(gates.shape) == (B, T, n if causal else n + 1), f"gates must be {(B, T, n if causal else n + 1)}, got {tuple(gates.shape)}")
    ks = [w.shape[-1] for w in weights]
    for w, b_ in zip(weights, biases):
        check(tuple(w.shape) == (C, 1, w.shape[-1]) and w.is_contiguous(), f"conv weight must be contiguous (C, 1, K), got {tuple(w.shape)}")
        check(tuple(b_.shape) == (C,), f"conv bias must be ({C},), got {tuple(b_.shape)}")
    if caches is not None:
        check(causal, "caches only exist for the causal form")
        check(idx is not None and start is not None and idx.shape == (B,) and start.shape == (B,), "streaming needs idx (B,) and start (B,)")
        check(min(ks) >= 2, "causal convs with caches need kernels of at least 2 taps")
        check_rings(caches, ks, C)
        check_device(ctx, gates, idx, start, *caches, *weights)
    else:
        check_device(ctx, gates, *weights)
    return ks


def focal_context(
    ctx: Tensor,
    gates: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    causal: bool,
    caches: list[Tensor] | None = None,
    idx: Tensor | None = None,
    start: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Triton launcher; same contract as `focal_context_ref` (rings updated in place)."""
    B, T, C = ctx.shape
    ks = _check_args(ctx, gates, weights, biases, causal, caches, idx, start)
    has_cache = caches is not None
    out = out_or_new(out, (B, T, C), ctx.dtype, ctx.device)
    bc, bt, bks, br, warps = _blocks(T, C, ks, ctx.dtype)
    grid = (B, triton.cdiv(C, bc))
    if causal:
        c0, c1, c2 = caches if has_cache else (ctx, ctx, ctx)
        rs = [ring_len(k) for k in ks]
        stream = has_cache and T <= STREAM_FRAMES
        if stream and B >= WINDOW_ROWS and min(ks) >= 4:
            # many rows: the window level's ring taps as a GEMM over the rows, then the rest
            # with the rows on the tile (see _focal_rows_kernel)
            pre = _window_rows(c2, idx, start, weights[2], rs[2], C)
            bs, bcr, w_ = _rows_tile(B, C)
            _focal_rows_kernel[(triton.cdiv(B, bs), triton.cdiv(C, bcr))](
                ctx, ctx.stride(0), ctx.stride(1), gates, gates.stride(0), gates.stride(1),
                weights[0], biases[0], weights[1], biases[1], weights[2], biases[2],
                c0, c1, c2, idx, start, pre, out, B, T, C,
                K0=ks[0], K1=ks[1], K2=ks[2], R0=rs[0], R1=rs[1], R2=rs[2],
                BLOCK_S=bs, BLOCK_C=bcr, INTERP=INTERPRET, num_warps=w_, **launch_opts(ctx),
            )
            return out
        scratch = torch.empty(2, B, C, T, device=ctx.device, dtype=torch.float32)
        _focal_causal_kernel[grid](
            ctx, ctx.stride(0), ctx.stride(1), gates, gates.stride(0), gates.stride(1),
            weights[0], biases[0], weights[1], biases[1], weights[2], biases[2],
            c0, c1, c2, idx if has_cache else ctx, start if has_cache else ctx,
            scratch[0], scratch[1], out, T, C,
            K0=ks[0], K1=ks[1], K2=ks[2], R0=rs[0], R1=rs[1], R2=rs[2],
            HAS_CACHE=has_cache, STREAM=stream, BLOCK_C=bc, BLOCK_T=bt,
            BK0=bks[0], BK1=bks[1], BK2=bks[2], BLOCK_R=br, BLOCK_U=min(pow2(T), 64),
            INTERP=INTERPRET, num_warps=warps, **launch_opts(ctx),
        )
    else:
        scratch = torch.empty(2, B, C, T, device=ctx.device, dtype=torch.float32)
        _focal_same_kernel[grid](
            ctx, ctx.stride(0), ctx.stride(1), gates, gates.stride(0), gates.stride(1),
            weights[0], biases[0], weights[1], biases[1], scratch[0], scratch[1], out, T, C,
            K0=ks[0], K1=ks[1], BLOCK_C=bc, BLOCK_T=bt, BK0=bks[0], BK1=bks[1], INTERP=INTERPRET,
            num_warps=warps, **launch_opts(ctx),
        )
    return out


# --------------------------------------------------------------------------- reference
def _causal_pad(x: Tensor, pad: int, cache: Tensor | None, fresh: Tensor | None) -> Tensor:
    """Left-pad x (B, C, T): cache rows, or the first frame offline and for fresh rows."""
    if cache is None:
        left = x[:, :, :1].expand(-1, -1, pad)
    else:
        left = torch.where(fresh[:, None, None], x[:, :, :1].expand(-1, -1, pad), cache.to(x.dtype))
    return torch.cat([left, x], dim=2)


def ring_window(buf: Tensor, idx: Tensor, start: Tensor, P: int) -> Tensor:
    """(B, C, P) frames start-P .. start-1 of ring rows idx (slot f mod R holds frame f;
    frames before 0 read frame 0). Meaningless for fresh rows (start 0): nothing is there yet."""
    return buf[idx[:, None], :, ring_slots(start, -P, P, buf.shape[2])].transpose(1, 2)


@triton.jit
def _ring_write_kernel(s0_ptr, s1_ptr, s2_ptr, r0_ptr, r1_ptr, r2_ptr, idx_ptr, start_ptr, C, T,
                       R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_F: tl.constexpr, PDL: tl.constexpr):
    """A long run's three level rings in one launch (the reference's index arithmetic and
    scatter are ~6 launches a level): program (row, channel block, level)."""
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    row = tl.load(idx_ptr + b)
    start = tl.load(start_ptr + b)
    lvl = tl.program_id(2)
    src = b * C * T  # runs (B, C, T): frame stride 1, channel stride T
    if lvl == 0:
        _ring_write(r0_ptr + row * C * R0, s0_ptr + src, 1, T, c, cm, T, start, R0, BLOCK_F)
    elif lvl == 1:
        _ring_write(r1_ptr + row * C * R1, s1_ptr + src, 1, T, c, cm, T, start, R1, BLOCK_F)
    else:
        _ring_write(r2_ptr + row * C * R2, s2_ptr + src, 1, T, c, cm, T, start, R2, BLOCK_F)


def ring_write3(bufs: list[Tensor], idx: Tensor, start: Tensor, xs: list[Tensor]) -> None:
    """`ring_write` of three (B, C, T) contiguous runs into their rings (S, C, R_l), one launch."""
    B, C, T = xs[0].shape
    check(len(bufs) == len(xs) == 3, "three levels")
    check(all(x.shape == (B, C, T) and x.is_contiguous() for x in xs), f"runs must be contiguous ({B}, {C}, {T})")
    check(all(r.dim() == 3 and r.shape[1] == C and r.is_contiguous() and r.dtype == xs[0].dtype
              and r.shape[2] & (r.shape[2] - 1) == 0 for r in bufs), "rings must be contiguous (S, C, 2^k), the runs' dtype")
    check(idx.shape == (B,) and start.shape == (B,), f"idx and start must be ({B},)")
    if B == 0 or T == 0:
        return
    bc = 32
    _ring_write_kernel[(B, triton.cdiv(C, bc), 3)](
        *xs, *bufs, idx, start, C, T, R0=bufs[0].shape[2], R1=bufs[1].shape[2], R2=bufs[2].shape[2],
        BLOCK_C=bc, BLOCK_F=64, **launch_opts(xs[0]),
    )


def ring_write(buf: Tensor, idx: Tensor, start: Tensor, x: Tensor) -> None:
    """The step's frames x (B, C, T) into ring rows idx: the newest min(T, R), frame f in slot f mod R."""
    T, R = x.shape[2], buf.shape[2]
    m = min(T, R)
    buf[idx[:, None], :, ring_slots(start, T - m, m, R)] = x[:, :, T - m:].transpose(1, 2).to(buf.dtype)


def focal_context_long(
    ctx: Tensor,
    gates: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    caches: list[Tensor] | None = None,
    idx: Tensor | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """The causal form for long runs (offline segments): same contract as `focal_context_ref`.
    Each level (14, 18 and 512 taps) with its GELU and gate term is one `_level_long_kernel`
    launch, a tensor-core GEMM per channel, where the reference's depthwise convs run on the CUDA
    cores (cuDNN: ~5 TFLOP/s at 512 taps on an H200) with an elementwise pass per pad, GELU,
    product and sum. Returns acc (B, T, C) as a view of (B, C, T), like the reference."""
    B, T, C = ctx.shape
    _check_args(ctx, gates, weights, biases, True, caches, idx, start)
    has_cache = caches is not None
    x = ctx.transpose(1, 2).contiguous()
    acc = torch.empty_like(x)
    ys = [torch.empty_like(x), torch.empty_like(x)]
    f32 = ctx.dtype == torch.float32 or INTERPRET  # the interpreter's bf16 dot is broken
    # sm_90 (`sm90_compile.py --only long`): 16-bit 64 tiles x 64 frames x 32 taps, 8 warps,
    # 148-177 registers; fp32 (FMA dots) 32 x 64 x 16, 80-223; larger tiles spill
    bm, bu, bj, nw = (32, 64, 16, 8) if ctx.dtype == torch.float32 else (64, 64, 32, 8)
    if _LONG_TILE_OVERRIDE and not _common.INTERP_TILES:
        bm, bu, bj, nw = (int(v) for v in _LONG_TILE_OVERRIDE.split(","))
    elif _common.INTERP_TILES:  # the interpreter pays per op: one trip of taps
        bm, bu, nw = 16, 32, 4
    n_tiles = triton.cdiv(T, bu)
    for lvl, (w, b_) in enumerate(zip(weights, biases)):
        K = w.shape[-1]
        src = x if lvl == 0 else ys[lvl - 1]
        _level_long_kernel[(triton.cdiv(B * n_tiles, bm), C)](
            src, caches[lvl] if has_cache else src, idx if has_cache else src, start if has_cache else src,
            w, b_, gates, gates.stride(0), gates.stride(1), acc, ys[lvl] if lvl < 2 else acc,
            T, C, n_tiles, B * n_tiles, K=K, R=ring_len(K), HAS_CACHE=has_cache, LEVEL=lvl, WRITE_Y=lvl < 2,
            BLOCK_M=bm, BLOCK_U=bu, BLOCK_J=min(pow2(K - 1 + bu), 1024) if _common.INTERP_TILES else bj, PREC=_common.dot_precision(ctx.dtype), DOT_F32=f32, INTERP=INTERPRET,
            num_warps=nw, **launch_opts(ctx),
        )
    if has_cache:  # after every read: the writes may overwrite them
        ring_write3(caches, idx, start, [x, *ys])
    return acc.transpose(1, 2)


def focal_context_ref(
    ctx: Tensor,
    gates: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    causal: bool,
    caches: list[Tensor] | None = None,
    idx: Tensor | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """All focal levels of one modulation layer.

    ctx (B, T, C), gates (B, T, L+1); weights (C, 1, K_l), biases (C,). Causal: L+1 convs, the
    last one the window conv. Non-causal: L convs, the last level is GELU(mean_t). Streaming:
    caches are the full ring tensors (S, C, ring_len(K_l)), rows idx (B,) read and updated in
    place; start (B,) counts each row's earlier frames (0: a fresh stream). Returns acc (B, T, C).
    """
    c = ctx.transpose(1, 2)
    acc = None
    n_levels = gates.shape[-1]
    new = []
    fresh = None if caches is None else (start == 0)
    for lvl, (w, b) in enumerate(zip(weights, biases)):
        k = w.shape[-1]
        if causal:
            win = None if caches is None else ring_window(caches[lvl], idx, start, k - 1)
            xp = _causal_pad(c, k - 1, win, fresh)
            if caches is not None:
                new.append(c)
            c = grouped_conv1d(xp, w, b, c.shape[1])
        else:
            c = grouped_conv1d(F.pad(c, ((k - 1) // 2, k // 2)), w, b, c.shape[1])
        c = F.gelu(c)
        term = c * gates[:, :, lvl].unsqueeze(1)
        acc = term if acc is None else acc + term
    if not causal:
        glob = F.gelu(c.mean(dim=2, keepdim=True))
        acc = acc + glob * gates[:, :, n_levels - 1].unsqueeze(1)
    for buf, x in zip(caches or [], new):  # after every read: the writes may overwrite them
        ring_write(buf, idx, start, x)
    return acc.transpose(1, 2)
