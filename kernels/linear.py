"""Few-row matmul with its epilogue in the same kernel, for small-batch streaming steps:

    out = ACT(res + gamma * mul * (NORM(x) W^T + bias))   every part optional (see epilogue.py)

NORM, a prologue: LayerNorm, DynamicTanh or Snake of x's rows (each program reads whole rows
of x anyway), so a pre-norm block's norm costs no launch of its own; the normalised rows can
be stored on the side for another consumer (attention's gate reads LN_a(x) too).

A batch-1 step has 4 rows per Linear, so each matmul is a read of the weight and nothing else;
on cuBLAS it is one launch and the epilogue another (45 epilogue launches a step, plus 6 for
focal modulation's q * (m + b)). Here each program reads a (BLOCK_N, K) slab of W once, the
few rows of x from L2, and applies the epilogue to its (rows, BLOCK_N) tile before the one store.

x may be a strided (B, T, K) view with unit stride along K: overlapping conv windows (row
stride = conv stride * C) read straight from the signal buffer, the weight's taps reordered to
match, so there is no unfold copy. `causal_conv` goes further for the feature extractor's
streaming convs: the windows run over [cache rows ‖ frames] read in place (no pad copy, no
fresh-row patch, no gather of the cache rows).

Many rows (offline runs, big-batch steps; `ops.LARGE_GEMM`): the same kernel with GEMM tiles
(128 x 128 x 64 in bf16/fp16), the epilogue still fused and the conv windows still read in
place (no unfold, pad or gather copy). Programs walk the column tiles of one row block before
the next, so a row block is read from DRAM once and its other column tiles hit L2 (our weights,
<= 1024 x 4096, stay in L2 throughout). With the tap boundaries on block edges (C % BLOCK_K == 0)
a conv window's K block is one tap: one contiguous row read per window, no per-element division.

A LayerNorm (+ GELU) of each output row can close the epilogue (`post_norm`) when one column
tile holds the whole row (N <= 1024): the first feature-extractor conv's output, the model's
largest activation, is then written once, not written, read and rewritten by a norm pass.

Float32 accumulates IEEE products (no TF32): fp32 is the exact path.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import INTERPRET, check, check_device, evenly_strided_rows, gelu, launch_opts, pdl_wait, pow2, prefetch_l2, ring_slots, sin, tanh
from .epilogue import ACTS, apply_epilogue, check_epilogue


def _tile_override(name: str, parts: str):
    """FASTFOCAL_LINEAR_TILE=block_n,block_k,warps,stages (few rows) and FASTFOCAL_GEMM_TILE=
    block_m,block_n,block_k,warps,stages (many rows): the GPU sweep's overrides, read once."""
    v = os.environ.get(name)
    if not v:
        return None
    try:
        t = tuple(int(p) for p in v.split(","))
    except ValueError:
        t = ()
    if len(t) != parts.count(",") + 1:
        raise ValueError(f"{name} must be {parts}, got {v!r}")
    return t


TILE_OVERRIDE = _tile_override("FASTFOCAL_LINEAR_TILE", "block_n,block_k,warps,stages")
GEMM_TILE_OVERRIDE = _tile_override("FASTFOCAL_GEMM_TILE", "block_m,block_n,block_k,warps,stages")
ROWS_TILE_OVERRIDE = _tile_override("FASTFOCAL_ROWS_GEMM_TILE", "block_m,block_k,warps,stages")  # whole-row tiles
BLOCK_M = 16  # tl.dot's smallest M; the rows past M are masked (no bytes read)
FEW_ROWS = 64  # up to here the weight read bounds the call: narrow column slabs; beyond, GEMM tiles
NORMS = {"none": 0, "layer_norm": 1, "dyt": 2, "snake": 3}  # the prologue on x's channels


@triton.jit
def _a_tile(x_ptr, r, k0, k, rm, am, T, sxb, sxt, cache_ptr, crow_ptr, fresh_ptr, C, P, STRIDE, goff,
            CONV: tl.constexpr, HAS_IDX: tl.constexpr, HAS_FRESH: tl.constexpr, ALIGNED: tl.constexpr,
            GROUP_I: tl.constexpr, RING: tl.constexpr):
    """Rows r, columns k = k0 + arange of the matmul's input: x viewed as (B, T, K) rows, or
    (CONV) the windows of a causal conv over [cache rows ‖ x]: row (b, t), column k = tap * C +
    channel reads padded frame t * STRIDE + tap, the first P from the cache (a fresh row: x's
    frame 0; HAS_FRESH 1: fresh_ptr a (B,) mask, 2: the rows' frame counts, fresh where 0).
    ALIGNED (C % BLOCK_K == 0): the block is one tap, its channels contiguous.
    GROUP_I: a grouped conv's windows, column k = tap * GROUP_I + i reading frame t + tap
    (frames C apart), channel goff + i (goff: the program's group times GROUP_I). With RING (its
    slot count, a power of two; CONV or GROUP_I) the padded frames are [ring ‖ x] (`_ring_tile`)."""
    b = r // T
    t = r % T
    if RING > 0:
        if CONV:
            p = t[:, None] * STRIDE + (k // C)[None, :]
            ch = (k % C)[None, :]
        else:
            p = t[:, None] + (k // GROUP_I)[None, :]
            ch = (goff + k % GROUP_I)[None, :]
        return _ring_tile(x_ptr, cache_ptr, crow_ptr, fresh_ptr, b, rm, am, p, ch, sxb, C, P, RING, HAS_IDX,
                          HAS_FRESH == 2)
    elif CONV:
        if ALIGNED:
            tap = k0 // C
            p = t[:, None] * STRIDE + tap
            c = (k - tap * C)[None, :]
        else:
            p = t[:, None] * STRIDE + (k // C)[None, :]
            c = (k % C)[None, :]
        from_x = p >= P
        if HAS_FRESH == 1:  # a (B,) mask
            from_x = from_x | (tl.load(fresh_ptr + b, mask=rm, other=0) != 0)[:, None]
        elif HAS_FRESH == 2:  # the rows' frame counts: fresh where 0
            from_x = from_x | (tl.load(fresh_ptr + b, mask=rm, other=1) == 0)[:, None]
        xi = tl.where(p >= P, p - P, 0)
        vx = tl.load(x_ptr + b[:, None] * sxb + xi * C + c, mask=am & from_x, other=0.0)
        if HAS_IDX:
            crow = tl.load(crow_ptr + b, mask=rm, other=0)
        else:
            crow = b
        vc = tl.load(cache_ptr + crow[:, None] * (P * C) + p * C + c, mask=am & (p < P) & ~from_x, other=0.0)
        return tl.where(from_x, vx, vc)
    elif GROUP_I > 0:
        off = (k // GROUP_I) * C + goff + k % GROUP_I  # GROUP_I a power of two: shifts and masks
        return tl.load(x_ptr + (b * sxb + t * sxt)[:, None] + off[None, :], mask=am, other=0.0)
    else:
        return tl.load(x_ptr + (b * sxb + t * sxt)[:, None] + k[None, :], mask=am, other=0.0)


@triton.jit
def _ring_tile(x_ptr, ring_ptr, crow_ptr, start_ptr, b, rm, am, p, ch, sxb, C, P, RING: tl.constexpr,
               HAS_IDX: tl.constexpr, REPLICATE: tl.constexpr):
    """Padded frame p, channel ch of rows b over [ring ‖ x]: stream frame g = start_b - P + p,
    a new frame (x's g - start_b) when g >= start_b, else ring slot g mod RING of cache row
    crow; before a stream's first frame its first (REPLICATE) or zeros."""
    s = tl.load(start_ptr + b, mask=rm, other=0)[:, None]
    g = s - P + p
    if REPLICATE:
        g = tl.maximum(g, 0)
    new = g >= s
    vx = tl.load(x_ptr + b[:, None] * sxb + (g - s) * C + ch, mask=am & new, other=0.0)
    if HAS_IDX:
        crow = tl.load(crow_ptr + b, mask=rm, other=0)
    else:
        crow = b
    vr = tl.load(ring_ptr + crow[:, None] * (RING * C) + (g & (RING - 1)) * C + ch, mask=am & ~new & (g >= 0),
                 other=0.0)
    return tl.where(new, vx, vr)


@triton.jit
def _ring_store(x_ptr, ring_ptr, crow_ptr, start_ptr, r, rm, T, sxb, C, c0, n, RING: tl.constexpr,
                HAS_IDX: tl.constexpr, CH: tl.constexpr):
    """x's frame t of row b (channels c0 .. c0 + n, CH at a time) into ring slot (start_b + t) mod RING."""
    b = r // T
    t = r % T
    s = tl.load(start_ptr + b, mask=rm, other=0)
    if HAS_IDX:
        crow = tl.load(crow_ptr + b, mask=rm, other=0)
    else:
        crow = b
    src = (b * sxb + t * C)[:, None]
    dst = (crow * (RING * C) + ((s + t) & (RING - 1)) * C)[:, None]
    for j in range(0, n, CH):
        ch = c0 + j + tl.arange(0, CH)
        m = rm[:, None] & (ch < c0 + n)[None, :]
        tl.store(ring_ptr + dst + ch[None, :], tl.load(x_ptr + src + ch[None, :], mask=m, other=0.0), mask=m)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, res_ptr, gamma_ptr, alpha_ptr, mul_ptr, out_ptr,
                   nw_ptr, nb_ptr, nalpha_ptr, nout_ptr, cache_ptr, crow_ptr, fresh_ptr,
                   M, N, K, T, sxb, sxt, swn, mul_sr, lo, hi, eps, C, P, STRIDE, N_TILES, GROUP_O,
                   HAS_BIAS: tl.constexpr, HAS_MUL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr,
                   ACT: tl.constexpr, NORM: tl.constexpr, STORE_NORM: tl.constexpr,
                   CONV: tl.constexpr, HAS_IDX: tl.constexpr, HAS_FRESH: tl.constexpr, ALIGNED: tl.constexpr,
                   GROUP_I: tl.constexpr, RING: tl.constexpr, WRITE_RING: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   INTERP: tl.constexpr, PDL: tl.constexpr, POST_NORM: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = pid % N_TILES  # column tiles of a row block run together: its rows are read once from DRAM
    r = (pid // N_TILES).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, nm = r < M, n < N
    wrow = n.to(tl.int64) * swn
    if PDL == 2:  # few rows: the weight slab into L2 while the previous kernel finishes (no kernel writes weights)
        LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
        for k0 in range(0, K, 32 * LINE):
            kl = k0 + tl.arange(0, 32) * LINE
            prefetch_l2(w_ptr + wrow[:, None] + kl[None, :], nm[:, None] & (kl < K)[None, :])
    pdl_wait(PDL)
    goff = (pid_n * BLOCK_N) // GROUP_O * GROUP_I  # a grouped conv: the column tile's group (BLOCK_N | GROUP_O)
    if NORM == 1:  # LayerNorm statistics of the rows: mean, then the centred variance (as norm.py)
        s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = _a_tile(x_ptr, r, k0, k, rm, rm[:, None] & (k < K)[None, :], T, sxb, sxt, cache_ptr, crow_ptr,
                        fresh_ptr, C, P, STRIDE, goff, CONV, HAS_IDX, HAS_FRESH, ALIGNED, GROUP_I, RING)
            s1 += tl.sum(a.to(tl.float32), 1)
        mean = s1 / K
        s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km2 = rm[:, None] & (k < K)[None, :]
            a = _a_tile(x_ptr, r, k0, k, rm, km2, T, sxb, sxt, cache_ptr, crow_ptr, fresh_ptr, C, P, STRIDE,
                        goff, CONV, HAS_IDX, HAS_FRESH, ALIGNED, GROUP_I, RING)
            d = tl.where(km2, a.to(tl.float32) - mean[:, None], 0.0)
            s2 += tl.sum(d * d, 1)
        rstd = 1.0 / tl.sqrt(s2 / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        am = rm[:, None] & km[None, :]
        a = _a_tile(x_ptr, r, k0, k, rm, am, T, sxb, sxt, cache_ptr, crow_ptr, fresh_ptr, C, P, STRIDE,
                    goff, CONV, HAS_IDX, HAS_FRESH, ALIGNED, GROUP_I, RING)
        if NORM == 1:
            g = tl.load(nw_ptr + k, mask=km, other=0.0).to(tl.float32)
            b = tl.load(nb_ptr + k, mask=km, other=0.0).to(tl.float32)
            y = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
            a = tl.where(am, y, 0.0).to(w_ptr.dtype.element_ty)  # rounded as the norm's stored output
        elif NORM == 2:
            y = tanh(tl.load(nalpha_ptr).to(tl.float32) * a.to(tl.float32), INTERP)
            a = tl.where(am, y, 0.0).to(w_ptr.dtype.element_ty)
        elif NORM == 3:  # Snake, alpha per input channel (the decompressor's upscale activation)
            al = tl.load(nalpha_ptr + k, mask=km, other=1.0).to(tl.float32)[None, :]
            af = a.to(tl.float32)
            sn = sin(al * af, INTERP)
            a = tl.where(am, af + sn * sn / (al + 1e-9), 0.0).to(w_ptr.dtype.element_ty)
        if STORE_NORM:  # one column of programs writes the normalised rows
            if pid_n == 0:
                tl.store(nout_ptr + r[:, None] * K + k[None, :], a, mask=am)
        w = tl.load(w_ptr + wrow[:, None] + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        if INTERP:  # the interpreter's bf16 dot is broken: products of the same values in fp32
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w), input_precision=PREC)
    # the rows' new frames into the ring (no window of this step reads their slots: RING >= P + T):
    # a grouped conv's first column tile of each group writes the group's channels, else column tile 0 all
    if WRITE_RING and GROUP_I > 0:
        if (pid_n * BLOCK_N) % GROUP_O == 0:
            _ring_store(x_ptr, cache_ptr, crow_ptr, fresh_ptr, r, rm, T, sxb, C, goff, GROUP_I, RING, HAS_IDX, GROUP_I)
    elif WRITE_RING:
        if pid_n == 0:
            _ring_store(x_ptr, cache_ptr, crow_ptr, fresh_ptr, r, rm, T, sxb, C, 0, C, RING, HAS_IDX, BLOCK_K)
    y = apply_epilogue(acc, r, n, rm, nm, N, b_ptr, res_ptr, gamma_ptr, alpha_ptr, mul_ptr, mul_sr, lo, hi,
                       HAS_BIAS, HAS_MUL, HAS_GAMMA, HAS_RES, ACT, INTERP)
    if POST_NORM:  # LayerNorm (2: then GELU) of whole rows (one column tile), from the rounded output as norm.py reads it
        yr = tl.where(nm[None, :], y.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
        mean = tl.sum(yr, 1) / N
        d = tl.where(nm[None, :], yr - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + eps)
        g = tl.load(nw_ptr + n, mask=nm, other=0.0).to(tl.float32)
        bb = tl.load(nb_ptr + n, mask=nm, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * g[None, :] + bb[None, :]
        if POST_NORM == 2:
            y = gelu(y, INTERP)
    tl.store(out_ptr + r[:, None] * N + n[None, :], y.to(out_ptr.dtype.element_ty), mask=rm[:, None] & nm[None, :])


def _rows3(x: Tensor) -> Tensor:
    """x (..., K) as a (B, T, K) view with unit stride along K (a copy only when it has none)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() <= 2:
        return x.view(1, -1, x.shape[-1]) if x.dim() == 1 else x.unsqueeze(0)
    if x.dim() == 3:
        return x
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-2], x.shape[-1])


def tile(M: int, N: int, K: int, dtype: torch.dtype, conv: bool = False, C: int = 0,
         whole_rows: bool = False, grouped: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Few rows (<= FEW_ROWS), on the GPU: narrow
    column slabs so even N = 1024 spreads over 64+ SMs; K in at most ~8 blocks of 128-512
    (bf16/fp16) or 64-256 (fp32) elements, 4 stages deep, so each program keeps 16-64 KB of
    weights in flight and the 64-128 programs together the few MB that the bandwidth-latency
    product needs (a K = 4096 slab in 128-wide blocks would be 32 dependent rounds at ~1 MB in
    flight). Many rows: GEMM tiles (tensor-core sized in 16-bit, smaller for the FMA-bound
    IEEE fp32), K blocks on the conv's tap boundaries where C allows. whole_rows: one column
    tile holds a whole row (a LayerNorm epilogue), fewer rows a tile to keep it in registers.
    grouped: a grouped conv's windows (per-element addressing, like a conv's): tiles capped as a
    conv's, and fp32 GEMM tiles of 32 rows (64 spilled 48 bytes under Triton 3.6, the device's)."""
    if whole_rows:
        bn = pow2(N)
        if _common.INTERP_TILES:
            return min(max(BLOCK_M, pow2(M)), 128), bn, min(pow2(K), 128), 4, 1
        # from the sm_90 compile: 64-row tiles spill at 8 warps, and 16 warps cap a thread at 128
        # registers; these take 122-128 (16-bit, 16 warps) and 190-216 (fp32, 8 warps), no spills
        bm, bk, w, st = (16, 16, 8, 2) if dtype == torch.float32 else (32, 32, 16, 3)
        if ROWS_TILE_OVERRIDE is not None:
            bm, bk, w, st = ROWS_TILE_OVERRIDE
        elif M <= FEW_ROWS:
            bm = BLOCK_M
        while conv and bk > 16 and C % bk:
            bk //= 2
        return bm, bn, bk, w, st
    if M > FEW_ROWS:
        if GEMM_TILE_OVERRIDE is not None:
            return GEMM_TILE_OVERRIDE
        if _common.INTERP_TILES:
            bk = min(pow2(K), 128)
            while conv and bk > 16 and C % bk:
                bk //= 2
            return 128, min(pow2(N), 128), bk, 4, 1
        if dtype == torch.float32:
            bm, bn, bk, w = 32 if grouped else 64, 64, 32, 4
        else:
            bm, bn, bk, w = 128, 128 if N > 64 else 64, 64, 8
        if conv:
            while bk > 16 and C % bk:
                bk //= 2
            if C % bk:  # per-element window addressing: keep the tile in registers
                bm = min(bm, 64)
        return bm, bn, bk, w, 3
    bm = min(max(BLOCK_M, pow2(M)), FEW_ROWS)  # more rows: more row tiles, the slab re-read from L2
    if _common.INTERP_TILES:  # the interpreter pays per program: whole rows in few programs
        return bm, min(pow2(N), 512), min(pow2(K), 1024), 4, 1
    if TILE_OVERRIDE is not None:
        bn, bk, w, s = TILE_OVERRIDE
        return bm, bn, bk, w, s
    bn = 32 if triton.cdiv(N, 32) >= 128 else 16
    lo_k, hi_k = (64, 256) if dtype == torch.float32 else (128, 512)
    hi_k = min(hi_k, 32768 // (bm * (4 if dtype == torch.float32 else 2)))  # x tile <= 32 KB: no spills at 64 rows
    if conv or grouped:  # per-element window addressing: <= 4096 elements a tile keeps it in registers
        hi_k = min(hi_k, 4096 // bm)  # (a grouped 16 x 512 tile spilled 72 bytes under Triton 3.6)
    bk = min(max(lo_k, pow2(K // 8)), hi_k, max(16, pow2(K)))
    return bm, bn, bk, 4, 4


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "none", res: Tensor | None = None,
           gamma: Tensor | None = None, alpha: Tensor | None = None, mul: Tensor | None = None,
           lo: float = -1.0, hi: float = 1.0, norm: tuple | None = None, norm_out: Tensor | None = None,
           post_norm: tuple | None = None) -> Tensor:
    """ACT(res + gamma * mul * (NORM(x) W^T + bias)) -> (..., N) contiguous. x (..., K), weight
    (N, K) with unit stride along K, same dtype; mul (..., N) with unit channel stride and
    evenly strided rows; res (..., N). norm: ("layer_norm", weight, bias, eps), ("dyt", alpha)
    or ("snake", alpha (K,)) over x's K channels; norm_out (..., K) contiguous receives NORM(x).
    post_norm: (weight, bias, eps, gelu) -> LayerNorm over the N outputs of each row, then GELU
    if asked, after everything else (N <= MAX_POST_NORM; not with norm)."""
    check(weight.dim() == 2 and weight.shape[1] == x.shape[-1], f"weight must be (N, {x.shape[-1]}), got {tuple(weight.shape)}")
    check(x.shape[-1] > 0, "x needs at least one input channel")
    check(x.dtype == weight.dtype, f"x and weight dtypes differ: {x.dtype} vs {weight.dtype}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    N, K = weight.shape
    x3 = _rows3(x)
    M, T = x3.shape[0] * x3.shape[1], x3.shape[1]
    lead = tuple(x.shape[:-1])
    res = check_epilogue(lead + (N,), act, bias, res, gamma, alpha)
    mul_sr = 0
    if mul is not None:
        check(tuple(mul.shape) == lead + (N,), f"mul must be {lead + (N,)}, got {tuple(mul.shape)}")
        mul = evenly_strided_rows(mul)
        mul_sr = mul.stride(-2) if mul.dim() > 1 else 0
    kind, nw, nb, eps, nalpha = "none", None, None, 0.0, None
    if norm is not None:
        kind = norm[0]
        check(kind in NORMS, f"norm must be one of {list(NORMS)}, got {kind!r}")
        if kind == "layer_norm":
            nw, nb, eps = norm[1], norm[2], float(norm[3])
            check(nw.numel() == K and nb.numel() == K and nw.is_contiguous() and nb.is_contiguous(),
                  f"LayerNorm weight/bias must hold {K} contiguous values")
        elif kind == "dyt":
            nalpha = norm[1]
            check(nalpha.numel() == 1, "DynamicTanh alpha is one value")
        else:
            nalpha = norm[1]
            check(nalpha.numel() == K and nalpha.is_contiguous(), f"Snake alpha must hold {K} contiguous values")
    if norm_out is not None:
        check(norm is not None, "norm_out needs a norm")
        check(tuple(norm_out.shape) == tuple(x.shape) and norm_out.dtype == x.dtype and norm_out.is_contiguous(),
              f"norm_out must be contiguous {tuple(x.shape)} {x.dtype}")
    if post_norm is not None:
        check(norm is None, "a prologue norm and post_norm share the kernel's norm arguments: one or the other")
        nw, nb, eps = _check_post_norm(post_norm, N, x.dtype)
    check_device(x3, weight, *[v for v in (bias, res, gamma, alpha, mul, nw, nb, nalpha, norm_out) if v is not None])
    out = torch.empty(lead + (N,), dtype=x.dtype, device=x.device)
    _launch(x3, weight, out, M, T, x3.stride(0), x3.stride(1), None, bias=bias, act=act, res=res, gamma=gamma,
            alpha=alpha, mul=mul, mul_sr=mul_sr, lo=lo, hi=hi, kind=kind, nw=nw, nb=nb, eps=eps, nalpha=nalpha,
            norm_out=norm_out, post=0 if post_norm is None else 2 if post_norm[3] else 1)
    return out


MAX_POST_NORM = 1024  # a LayerNorm epilogue holds whole rows in one tile


def _check_post_norm(post_norm: tuple, N: int, dtype: torch.dtype) -> tuple:
    check(len(post_norm) == 4, "post_norm is (weight, bias, eps, gelu)")
    w, b, eps, _ = post_norm
    check(N <= MAX_POST_NORM, f"post_norm needs at most {MAX_POST_NORM} output channels, got {N}")
    check(w.shape == (N,) and b.shape == (N,) and w.is_contiguous() and b.is_contiguous() and w.dtype == b.dtype == dtype,
          f"post_norm weight/bias must be contiguous ({N},) {dtype}")
    return w, b, float(eps)


def causal_conv(x: Tensor, weight_kc: Tensor, k: int, stride: int, cache: Tensor, idx: Tensor | None = None,
                fresh: Tensor | None = None, bias: Tensor | None = None, post_norm: tuple | None = None) -> Tensor:
    """Causal conv1d over time (+ bias): x (B, T, C) contiguous frames left-padded by the k - 1
    frames of cache rows idx ((S, k - 1, C) contiguous; rows b for idx None), or by x's first
    frame repeated for `fresh` rows ((B,) bool, or the rows' frame counts (B,) int64: fresh
    where 0, so no mask is made); weight_kc (N, k * C), taps in (k, C) order.
    post_norm: (weight, bias, eps, gelu), a LayerNorm (+ GELU) of each output frame in the
    epilogue (`linear`). -> (B, T', N). The cache is only read (its update is the caller's, after this)."""
    check(x.dim() == 3 and x.is_contiguous(), f"x must be contiguous (B, T, C), got {tuple(x.shape)}")
    B, T, C = x.shape
    P = k - 1
    check(k >= 2 and stride >= 1, f"a causal conv needs k >= 2 taps and stride >= 1, got k={k} stride={stride}")
    check(weight_kc.dim() == 2 and weight_kc.shape[1] == k * C and weight_kc.dtype == x.dtype,
          f"weight must be (N, {k * C}) {x.dtype}, got {tuple(weight_kc.shape)} {weight_kc.dtype}")
    check(cache.dim() == 3 and tuple(cache.shape[1:]) == (P, C) and cache.is_contiguous() and cache.dtype == x.dtype,
          f"cache must be contiguous (S, {P}, {C}) {x.dtype}, got {tuple(cache.shape)} {cache.dtype}")
    check(idx is not None or cache.shape[0] == B, f"without idx the cache holds one row per input row ({B})")
    if idx is not None:
        check(idx.shape == (B,) and idx.dtype == torch.long, f"idx must be ({B},) int64")
    if fresh is not None:
        check(fresh.shape == (B,) and fresh.dtype in (torch.bool, torch.long),
              f"fresh must be ({B},) bool, or the rows' frame counts ({B},) int64")
    if weight_kc.stride(1) != 1:
        weight_kc = weight_kc.contiguous()
    if bias is not None:
        check(bias.shape == (weight_kc.shape[0],) and bias.dtype == x.dtype,
              f"bias must be ({weight_kc.shape[0]},) {x.dtype}")
    nw = nb = None
    eps = 0.0
    if post_norm is not None:
        nw, nb, eps = _check_post_norm(post_norm, weight_kc.shape[0], x.dtype)
    check_device(x, weight_kc, cache, *[v for v in (idx, fresh, bias, nw, nb) if v is not None])
    Tout = (T - 1) // stride + 1 if T else 0  # padded length T + P, windows of k = P + 1
    out = torch.empty(B, Tout, weight_kc.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, weight_kc, out, B * Tout, Tout, T * C, 0, (cache, idx, fresh, C, P, stride), bias=bias,
            nw=nw, nb=nb, eps=eps, post=0 if post_norm is None else 2 if post_norm[3] else 1)
    return out


def _check_grouped(x: Tensor, weight_kc: Tensor, k: int, groups: int, name: str) -> tuple[int, int, int]:
    """A grouped conv's input (B, L, C) contiguous and weight (O, k * C / groups), channels per
    group powers of two (outputs >= 16: a column tile stays in one group). Returns x's shape."""
    check(x.dim() == 3 and x.is_contiguous(), f"{name} must be contiguous (B, L, C), got {tuple(x.shape)}")
    C, O = x.shape[2], weight_kc.shape[0]
    check(groups >= 1 and C % groups == 0 and O % groups == 0, f"{groups} groups must divide {C} and {O} channels")
    I, Og = C // groups, O // groups
    check(I == pow2(I) and Og == pow2(Og) and Og >= 16,
          f"channels per group must be powers of two (outputs >= 16), got {I} in, {Og} out")
    check(weight_kc.dim() == 2 and weight_kc.shape[1] == k * I and weight_kc.dtype == x.dtype,
          f"weight must be ({O}, {k * I}) {x.dtype}, got {tuple(weight_kc.shape)} {weight_kc.dtype}")
    return tuple(x.shape)


def grouped_windows(xp: Tensor, weight_kc: Tensor, k: int, groups: int, bias: Tensor | None = None,
                    act: str = "none") -> Tensor:
    """ACT(grouped conv1d + bias) over time of an already padded, time-major xp (B, L, C), read
    in place (no unfold copy): weight_kc (O, k * C / groups), each row's taps in (k, C/groups)
    order. -> (B, L - k + 1, O). WavLM's positional conv (128 taps, 16 groups) in a step."""
    B, L, C = _check_grouped(xp, weight_kc, k, groups, "xp")
    O = weight_kc.shape[0]
    I, Og = C // groups, O // groups
    check(L >= k, f"xp has {L} frames, fewer than the {k} taps")
    T = L - k + 1
    check_epilogue((B, T, O), act, bias, None, None, None)
    if weight_kc.stride(1) != 1:
        weight_kc = weight_kc.contiguous()
    check_device(xp, weight_kc, *([bias] if bias is not None else []))
    out = torch.empty(B, T, O, dtype=xp.dtype, device=xp.device)
    _launch(xp, weight_kc, out, B * T, T, L * C, C, None, bias=bias, act=act, group=(I, Og))
    return out


def grouped_ring_conv(x: Tensor, weight_kc: Tensor, k: int, groups: int, ring: Tensor, idx: Tensor | None,
                      start: Tensor, bias: Tensor | None = None, act: str = "none", res: Tensor | None = None) -> Tensor:
    """ACT(grouped causal conv1d + bias) over [ring frames ‖ x] -> (B, T, O), read in place (no
    pad, gather or fresh-row patch), and x's frames written into the ring (res: the epilogue's
    residual, e.g. x itself with act "gelu_then_res"). x (B, T, C)
    contiguous new frames; ring (S, R, C) contiguous, R a power of two >= k - 1 (the kernel
    writes the frames itself when R >= k - 1 + T, else they are written after it), stream
    frame f in slot f mod R, rows idx (None: row b); start (B,) each row's frames before x (0:
    a fresh stream; frames before a stream's first are its first). weight_kc (O, k * C /
    groups), taps in (k, C / groups) order. WavLM's positional conv in a step."""
    B, T, C = _check_grouped(x, weight_kc, k, groups, "x")
    O = weight_kc.shape[0]
    I, Og = C // groups, O // groups
    R = _check_ring(x, k, ring, idx, start)
    res = check_epilogue((B, T, O), act, bias, res, None, None)
    if weight_kc.stride(1) != 1:
        weight_kc = weight_kc.contiguous()
    check_device(x, weight_kc, ring, start, *[v for v in (idx, bias, res) if v is not None])
    out = torch.empty(B, T, O, dtype=x.dtype, device=x.device)
    # the kernel writes the new frames when no window of this step reads their slots
    write = R >= k - 1 + T
    _launch(x, weight_kc, out, B * T, T, T * C, C, None, bias=bias, act=act, res=res, group=(I, Og),
            ring=(ring, idx, start, k - 1, write, True))
    if not write:  # a long run (an offline segment): after every read
        ring_write_time_major(ring, idx, start, x)
    return out


def _check_ring(x: Tensor, k: int, ring: Tensor, idx: Tensor | None, start: Tensor) -> int:
    """A time-major ring (S, R, C) for x (B, T, C): R a power of two >= k - 1. Returns R."""
    B, _, C = x.shape
    R = ring.shape[1] if ring.dim() == 3 else 0
    check(ring.dim() == 3 and ring.shape[2] == C and R == pow2(R) and R >= k - 1 and ring.is_contiguous()
          and ring.dtype == x.dtype,
          f"ring must be contiguous (S, R, {C}) {x.dtype}, R a power of two >= {k - 1}, got {tuple(ring.shape)} {ring.dtype}")
    check(idx is not None or ring.shape[0] == B, f"without idx the ring holds one row per input row ({B})")
    if idx is not None:
        check(idx.shape == (B,) and idx.dtype == torch.long, f"idx must be ({B},) int64")
    check(start.shape == (B,) and start.dtype == torch.long, f"start must be ({B},) int64")
    return R


def causal_ring_conv(x: Tensor, weight_kc: Tensor, k: int, ring: Tensor, idx: Tensor | None, start: Tensor,
                     bias: Tensor | None = None, replicate: bool = True) -> Tensor:
    """Causal conv1d over time (stride 1, + bias) over [ring frames ‖ x] -> (B, T, N), read in
    place, and x's frames written into the ring (in the kernel when no window reads their slots,
    R >= k - 1 + T). x (B, T, C) contiguous; ring (S, R, C) as `grouped_ring_conv`'s; frames
    before a stream's first are its first (`replicate`) or zeros. weight_kc (N, k * C), taps
    in (k, C) order. The decoder's embedding conv in a step."""
    check(x.dim() == 3 and x.is_contiguous(), f"x must be contiguous (B, T, C), got {tuple(x.shape)}")
    B, T, C = x.shape
    check(k >= 2, f"a causal conv needs k >= 2 taps, got {k}")
    check(weight_kc.dim() == 2 and weight_kc.shape[1] == k * C and weight_kc.dtype == x.dtype,
          f"weight must be (N, {k * C}) {x.dtype}, got {tuple(weight_kc.shape)} {weight_kc.dtype}")
    R = _check_ring(x, k, ring, idx, start)
    N = weight_kc.shape[0]
    check_epilogue((B, T, N), "none", bias, None, None, None)
    if weight_kc.stride(1) != 1:
        weight_kc = weight_kc.contiguous()
    check_device(x, weight_kc, ring, start, *[v for v in (idx, bias) if v is not None])
    out = torch.empty(B, T, N, dtype=x.dtype, device=x.device)
    write = R >= k - 1 + T
    _launch(x, weight_kc, out, B * T, T, T * C, C, None, bias=bias, ring=(ring, idx, start, k - 1, write, replicate))
    if not write:
        ring_write_time_major(ring, idx, start, x)
    return out


def ring_frames_time_major(ring: Tensor, idx: Tensor | None, start: Tensor, P: int) -> Tensor:
    """(B, P, C) frames start-P .. start-1 of time-major ring rows idx (S, R, C) (None: row b;
    frames before 0 read frame 0's slot). Meaningless for fresh rows (start 0)."""
    rows = torch.arange(start.shape[0], device=start.device) if idx is None else idx
    return ring[rows[:, None], ring_slots(start, -P, P, ring.shape[1])]


def ring_write_time_major(ring: Tensor, idx: Tensor | None, start: Tensor, x: Tensor) -> None:
    """x's frames (B, T, C) into time-major ring rows idx: the newest min(T, R), frame f in slot f mod R."""
    T, R = x.shape[1], ring.shape[1]
    m = min(T, R)
    rows = torch.arange(x.shape[0], device=x.device) if idx is None else idx
    ring[rows[:, None], ring_slots(start, T - m, m, R)] = x[:, T - m:].to(ring.dtype)


def _launch(x, weight, out, M, T, sxb, sxt, conv, bias=None, act="none", res=None, gamma=None, alpha=None,
            mul=None, mul_sr=0, lo=-1.0, hi=1.0, kind="none", nw=None, nb=None, eps=0.0, nalpha=None, norm_out=None,
            group=None, ring=None, post=0):
    N, K = weight.shape
    if M == 0 or N == 0:
        return
    cache, cidx, fresh, C, P, stride = conv if conv is not None else (None, None, None, 1, 0, 1)
    gi, go = (0, N) if group is None else group
    if group is not None:
        C = sxt  # the grouped windows' taps are frames apart
    R, write, is_conv = 0, False, conv is not None
    fresh_kind = 0 if conv is None or fresh is None else 2 if fresh.dtype == torch.long else 1
    if ring is not None:  # (ring, idx, start, P, write, replicate): windows over [ring ‖ x], grouped or not
        cache, cidx, fresh, P, write, replicate = ring
        R = cache.shape[1]
        fresh_kind = 2 if replicate else 0
        if group is None:  # a causal conv of stride 1 over x's C channels
            is_conv, C = True, x.shape[2]
    bm, bn, bk, warps, stages = tile(M, N, K, x.dtype, is_conv, C, whole_rows=post > 0, grouped=group is not None)
    if group is not None:
        bn = min(bn, go)  # a column tile within one group (go a power of two)
    n_tiles = triton.cdiv(N, bn)
    # a few-row call is bound by its weight read: split float32 dots buy it nothing, and at its
    # wide K blocks they spill (sm_90: 72-4,584 bytes of stack); it stays IEEE, exact
    prec = _common.dot_precision(x.dtype, exact=M <= FEW_ROWS)
    opts = launch_opts(x)
    if opts["PDL"] and M <= FEW_ROWS:  # a weight-read-bound call: prefetch its slab before the wait
        opts["PDL"] = 2
    _linear_kernel[(triton.cdiv(M, bm) * n_tiles,)](
        x, weight, bias if bias is not None else weight, res if res is not None else out,
        gamma if gamma is not None else weight, alpha if alpha is not None else weight,
        mul if mul is not None else out, out, nw if nw is not None else weight, nb if nb is not None else weight,
        nalpha if nalpha is not None else weight, norm_out if norm_out is not None else out,
        cache if cache is not None else x, cidx if cidx is not None else out, fresh if fresh is not None else out,
        M, N, K, T, sxb, sxt, weight.stride(0), mul_sr, float(lo), float(hi), eps, C, P, stride, n_tiles, go,
        HAS_BIAS=bias is not None, HAS_MUL=mul is not None, HAS_GAMMA=gamma is not None,
        HAS_RES=res is not None, ACT=ACTS[act], NORM=NORMS[kind],
        STORE_NORM=norm_out is not None, CONV=is_conv, HAS_IDX=cidx is not None,
        HAS_FRESH=fresh_kind, ALIGNED=conv is not None and C % bk == 0,
        GROUP_I=gi, RING=R, WRITE_RING=write, PREC=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INTERP=INTERPRET, POST_NORM=post, num_warps=warps, num_stages=stages,
        **opts,
    )


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "none", res: Tensor | None = None,
               gamma: Tensor | None = None, alpha: Tensor | None = None, mul: Tensor | None = None,
               lo: float = -1.0, hi: float = 1.0, norm: tuple | None = None, post_norm: tuple | None = None) -> Tensor:
    from .epilogue import epilogue_ref
    from .norm import norm_ref

    if norm is not None and norm[0] == "snake":
        x = epilogue_ref(x, None, "snake", alpha=norm[1])
    elif norm is not None:
        x = norm_ref(x, norm[1], norm[2], norm[3]) if norm[0] == "layer_norm" else norm_ref(x, alpha=norm[1])
    h = torch.nn.functional.linear(x, weight, bias)
    if mul is not None:
        h = h * mul
    h = epilogue_ref(h, None, act, res=res, gamma=gamma, alpha=alpha, lo=lo, hi=hi)
    return h if post_norm is None else norm_ref(h, post_norm[0], post_norm[1], post_norm[2], act_gelu=post_norm[3])
