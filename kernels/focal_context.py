"""Focal context: every level of one focal-modulation layer in one launch.

    acc = sum_l gates[l] * y_l,   y_l = GELU(dwconv_l(y_{l-1})),  y_{-1} = ctx

Causal: levels (14, 18 taps) then the window conv (512 taps), each left-padded with its own
cache (last K-1 input frames, (S, C, K-1) rows picked by a slot index) or, for a fresh stream
or offline, with its first input frame repeated. Non-causal: "same" zero padding for the two
levels, then GELU(mean over time of y_1) as the last level.

One program owns (row, channel block) and walks time in tiles: level l of a tile reads level
l-1's output of this and earlier tiles, so it goes through a float32 scratch (B, C, T),
re-read within a few tiles of being written (L2 hits). The window level dominates (512 taps); levels 0/1 and the cache shift are small.
At the end the program shifts its own cache rows in place (all reads of them are done).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, TILE, check, check_device, gelu, grouped_conv1d, out_or_new, pow2


@triton.jit
def _conv_gelu(new_ptr, new_st, new_sc, cache_ptr, w_ptr, b_ptr, offs_c, cmask, t0, T, newlo,
               K: tl.constexpr, PADL: tl.constexpr, CAUSAL: tl.constexpr, HAS_CACHE: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """GELU(depthwise conv + bias) for output frames t0..t0+BLOCK_T of one channel block.

    Input frame tau = t + k - PADL comes from the new frames when tau >= newlo (newlo is 0, or
    very negative for a fresh row: clamped to frame 0, the replicate rule), else from the cache
    row; non-causal pads with zeros on both sides.
    """
    t = t0 + tl.arange(0, BLOCK_T)
    c3 = offs_c[:, None, None]
    ok3 = cmask[:, None, None] & (t < T)[None, :, None]
    acc = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        w = tl.load(w_ptr + offs_c[:, None] * K + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        tau = t[None, :, None] + kk[None, None, :] - PADL
        ok = ok3 & kmask[None, None, :]
        if CAUSAL:
            use_new = tau >= newlo
            x = tl.load(new_ptr + tl.maximum(tau, 0) * new_st + c3 * new_sc, mask=ok & use_new, other=0.0).to(tl.float32)
            if HAS_CACHE:
                ci = tl.minimum(tau + (K - 1), K - 2)
                xc = tl.load(cache_ptr + c3 * (K - 1) + ci, mask=ok & (~use_new), other=0.0)
                x = x + xc.to(tl.float32)
        else:
            inr = (tau >= 0) & (tau < T)
            x = tl.load(new_ptr + tau * new_st + c3 * new_sc, mask=ok & inr, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32)[:, None, :] * x, axis=2)
    bias = tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    return gelu(acc + bias[:, None], INTERP)


@triton.jit
def _shift_cache(cache_ptr, new_ptr, new_st, new_sc, offs_c, cmask, T, newlo,
                 K: tl.constexpr, BLOCK_U: tl.constexpr):
    """cache <- last K-1 frames of [cache (or first frame if fresh) ‖ new], in place."""
    c2 = offs_c[:, None]
    for u0 in range(0, K - 1, BLOCK_U):
        i = u0 + tl.arange(0, BLOCK_U)
        m = cmask[:, None] & (i < K - 1)[None, :]
        tau = i - (K - 1) + T  # frame of [old cache ‖ new] that lands in slot i
        use_new = (tau >= newlo)[None, :]
        xn = tl.load(new_ptr + tl.maximum(tau, 0)[None, :] * new_st + c2 * new_sc, mask=m & use_new, other=0.0)
        xc = tl.load(cache_ptr + c2 * (K - 1) + tl.minimum(i + T, K - 2)[None, :], mask=m & (~use_new), other=0.0)
        v = tl.where(use_new, xn.to(tl.float32), xc.to(tl.float32))
        tl.debug_barrier()  # reads of this chunk (other threads) before its writes
        tl.store(cache_ptr + c2 * (K - 1) + i[None, :], v.to(cache_ptr.dtype.element_ty), mask=m)


@triton.jit
def _focal_causal_kernel(
    ctx_ptr, ctx_sb, ctx_st, g_ptr, g_sb, g_st,
    w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    c0_ptr, c1_ptr, c2_ptr, idx_ptr, fresh_ptr,
    s0_ptr, s1_ptr, out_ptr, T, C,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, HAS_CACHE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BK0: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
    BLOCK_U: tl.constexpr, INTERP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    if HAS_CACHE:
        slot = tl.load(idx_ptr + b).to(tl.int64)
        # fresh rows read frame max(tau, 0) for every tau: the first frame repeated
        newlo = tl.load(fresh_ptr + b).to(tl.int32) * -1073741824
    else:
        slot = b * 0
        newlo = -1073741824
    c0 = c0_ptr + slot * C * (K0 - 1)
    c1 = c1_ptr + slot * C * (K1 - 1)
    c2 = c2_ptr + slot * C * (K2 - 1)
    ctx = ctx_ptr + b * ctx_sb
    s0 = s0_ptr + b * C * T
    s1 = s1_ptr + b * C * T
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m2 = cmask[:, None] & (t < T)[None, :]
        sp = offs_c[:, None] * T + t[None, :]
        y0 = _conv_gelu(ctx, ctx_st, 1, c0, w0_ptr, b0_ptr, offs_c, cmask, t0, T, newlo,
                        K0, K0 - 1, True, HAS_CACHE, BLOCK_C, BLOCK_T, BK0, INTERP)
        tl.store(s0 + sp, y0, mask=m2)
        tl.debug_barrier()
        y1 = _conv_gelu(s0, 1, T, c1, w1_ptr, b1_ptr, offs_c, cmask, t0, T, newlo,
                        K1, K1 - 1, True, HAS_CACHE, BLOCK_C, BLOCK_T, BK1, INTERP)
        tl.store(s1 + sp, y1, mask=m2)
        tl.debug_barrier()
        y2 = _conv_gelu(s1, 1, T, c2, w2_ptr, b2_ptr, offs_c, cmask, t0, T, newlo,
                        K2, K2 - 1, True, HAS_CACHE, BLOCK_C, BLOCK_T, BK2, INTERP)
        gp = g_ptr + b * g_sb + t * g_st
        tm = t < T
        g0 = tl.load(gp, mask=tm, other=0.0).to(tl.float32)[None, :]
        g1 = tl.load(gp + 1, mask=tm, other=0.0).to(tl.float32)[None, :]
        g2 = tl.load(gp + 2, mask=tm, other=0.0).to(tl.float32)[None, :]
        acc = y0 * g0 + y1 * g1 + y2 * g2
        tl.store(out_ptr + b * T * C + t[None, :] * C + offs_c[:, None], acc.to(out_ptr.dtype.element_ty), mask=m2)
    if HAS_CACHE:
        tl.debug_barrier()
        _shift_cache(c0, ctx, ctx_st, 1, offs_c, cmask, T, newlo, K0, BLOCK_U)
        _shift_cache(c1, s0, 1, T, offs_c, cmask, T, newlo, K1, BLOCK_U)
        _shift_cache(c2, s1, 1, T, offs_c, cmask, T, newlo, K2, BLOCK_U)


@triton.jit
def _focal_same_kernel(
    ctx_ptr, ctx_sb, ctx_st, g_ptr, g_sb, g_st,
    w0_ptr, b0_ptr, w1_ptr, b1_ptr, s0_ptr, s1_ptr, out_ptr, T, C,
    K0: tl.constexpr, K1: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    BK0: tl.constexpr, BK1: tl.constexpr, INTERP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    ctx = ctx_ptr + b * ctx_sb
    s0 = s0_ptr + b * C * T
    s1 = s1_ptr + b * C * T
    # level 1 looks K1//2 frames ahead, so level 0 must be complete first
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        y0 = _conv_gelu(ctx, ctx_st, 1, ctx, w0_ptr, b0_ptr, offs_c, cmask, t0, T, 0,
                        K0, (K0 - 1) // 2, False, False, BLOCK_C, BLOCK_T, BK0, INTERP)
        tl.store(s0 + offs_c[:, None] * T + t[None, :], y0, mask=cmask[:, None] & (t < T)[None, :])
    tl.debug_barrier()
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m2 = cmask[:, None] & (t < T)[None, :]
        y1 = _conv_gelu(s0, 1, T, s0, w1_ptr, b1_ptr, offs_c, cmask, t0, T, 0,
                        K1, (K1 - 1) // 2, False, False, BLOCK_C, BLOCK_T, BK1, INTERP)
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


def _blocks(T: int, C: int, ks: list[int]):
    """(BLOCK_C, BLOCK_T, taps per iteration, warps). The (channels x frames x taps) product
    of one iteration (and the cache-shift chunk) is kept at 1024 elements over 8 warps: ptxas
    (sm_90) then needs 117 registers for a streaming step and 122 for 32-frame tiles, no
    spills; 4096 elements over 4 warps took 255."""
    block_t = min(pow2(T), 32)
    block_c = min(pow2(C), 128 if INTERPRET else 16)
    budget = max(1, (TILE if INTERPRET else 1024) // (block_c * block_t))
    return block_c, block_t, [min(pow2(k), budget) for k in ks], 8


def focal_context(
    ctx: Tensor,
    gates: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    causal: bool,
    caches: list[Tensor] | None = None,
    idx: Tensor | None = None,
    fresh: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Triton launcher; same contract as `focal_context_ref` (caches updated in place)."""
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
    has_cache = caches is not None
    if has_cache:
        check(causal, "caches only exist for the causal form")
        check(idx is not None and fresh is not None and idx.shape == (B,) and fresh.shape == (B,), "streaming needs idx (B,) and fresh (B,)")
        check(min(ks) >= 2, "causal convs with caches need kernels of at least 2 taps")
        for c, k in zip(caches, ks):
            check(c.dim() == 3 and c.shape[1:] == (C, k - 1) and c.is_contiguous(), f"cache must be contiguous (S, {C}, {k - 1}), got {tuple(c.shape)}")
        check_device(ctx, gates, idx, fresh, *caches, *weights)
    else:
        check_device(ctx, gates, *weights)
    out = out_or_new(out, (B, T, C), ctx.dtype, ctx.device)
    scratch = torch.empty(2, B, C, T, device=ctx.device, dtype=torch.float32)
    bc, bt, bks, warps = _blocks(T, C, ks)
    grid = (B, triton.cdiv(C, bc))
    if causal:
        c0, c1, c2 = caches if has_cache else (ctx, ctx, ctx)
        _focal_causal_kernel[grid](
            ctx, ctx.stride(0), ctx.stride(1), gates, gates.stride(0), gates.stride(1),
            weights[0], biases[0], weights[1], biases[1], weights[2], biases[2],
            c0, c1, c2, idx if has_cache else ctx, fresh if has_cache else ctx,
            scratch[0], scratch[1], out, T, C,
            K0=ks[0], K1=ks[1], K2=ks[2], HAS_CACHE=has_cache, BLOCK_C=bc, BLOCK_T=bt,
            BK0=bks[0], BK1=bks[1], BK2=bks[2], BLOCK_U=min(pow2(max(ks) - 1), bks[2] * bt), INTERP=INTERPRET,
            num_warps=warps,
        )
    else:
        _focal_same_kernel[grid](
            ctx, ctx.stride(0), ctx.stride(1), gates, gates.stride(0), gates.stride(1),
            weights[0], biases[0], weights[1], biases[1], scratch[0], scratch[1], out, T, C,
            K0=ks[0], K1=ks[1], BLOCK_C=bc, BLOCK_T=bt, BK0=bks[0], BK1=bks[1], INTERP=INTERPRET,
            num_warps=warps,
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


def _pad_from_cache(x: Tensor, buf: Tensor, idx: Tensor, fresh: Tensor) -> Tensor:
    """_causal_pad(x, K-1, buf rows idx, fresh), the rows gathered straight into the result and
    the fresh rows patched in place: one pass over the cache instead of three (index_select,
    where, cat). The window level's cache is 511 frames, so this is most of the level's traffic."""
    if buf.dtype != x.dtype or torch.compiler.is_exporting():  # exporters want the plain form
        return _causal_pad(x, buf.shape[2], buf.index_select(0, idx), fresh)
    B, C, T = x.shape
    P = buf.shape[2]
    xp = x.new_empty(B, C, P + T)
    left = xp[:, :, :P]
    torch.index_select(buf, 0, idx, out=left)
    torch.where(fresh[:, None, None], x[:, :, :1], left, out=left)
    xp[:, :, P:] = x
    return xp


def focal_context_ref(
    ctx: Tensor,
    gates: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    causal: bool,
    caches: list[Tensor] | None = None,
    idx: Tensor | None = None,
    fresh: Tensor | None = None,
) -> Tensor:
    """All focal levels of one modulation layer.

    ctx (B, T, C), gates (B, T, L+1); weights (C, 1, K_l), biases (C,). Causal: L+1 convs, the
    last one the window conv. Non-causal: L convs, the last level is GELU(mean_t). Streaming:
    caches are the full state tensors (S, C, K_l - 1), rows idx (B,) read and updated in place;
    fresh (B,) marks first chunks. Returns acc (B, T, C).
    """
    c = ctx.transpose(1, 2)
    acc = None
    n_levels = gates.shape[-1]
    new = []
    for lvl, (w, b) in enumerate(zip(weights, biases)):
        k = w.shape[-1]
        if causal:
            xp = _pad_from_cache(c, caches[lvl], idx, fresh) if caches is not None else _causal_pad(c, k - 1, None, None)
            if caches is not None:
                new.append(xp[:, :, xp.shape[2] - (k - 1):])
            c = grouped_conv1d(xp, w, b, c.shape[1])
        else:
            c = grouped_conv1d(F.pad(c, ((k - 1) // 2, k // 2)), w, b, c.shape[1])
        c = F.gelu(c)
        term = c * gates[:, :, lvl].unsqueeze(1)
        acc = term if acc is None else acc + term
    if not causal:
        glob = F.gelu(c.mean(dim=2, keepdim=True))
        acc = acc + glob * gates[:, :, n_levels - 1].unsqueeze(1)
    for buf, nc in zip(caches or [], new):
        buf.index_copy_(0, idx, nc)
    return acc.transpose(1, 2)
