"""Sliding-window chunked attention with WavLM's gated relative position bias, flash-style.

    o = softmax(q k^T / sqrt(d) + gate[h, i] * E[bucket(pos_j - pos_i), h] + mask) v

One program owns (query block, batch row, head). It computes the head's gate from the normed
input (gru_rel_pos_linear on the head's d features), then streams key blocks with an online
softmax: first the K/V ring of the stream's slot (positions start-R..start-1, slot r holding
the position congruent to r mod R), then the new frames. Bias and mask come from positions
on the fly; nothing T x T is built, memory is O(T * d).

Biases come from a table over offsets [-max_distance, max_distance] (offsets beyond saturate):
E at the bucket the reference `relative_bucket` itself gives each offset, built once per
embedding, so they are identical to the reference's by construction: the float32 log lands
within 4e-5 of an integer at offset 713, where a fast device log could round the other way.

When one query block covers all new frames (a streaming step), the same program then writes
the new K/V into its ring row (after a barrier: the oldest ring entries are still in the
window of this step's first queries). Longer inputs write the ring after the kernel.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import INTERPRET, check, check_device, derived, launch_opts, out_or_new, pdl_wait, pow2

LOG2E = 1.4426950408889634
ATTN_BLOCK = 256  # reference: query frames per block, bounds memory at O(block * window)
# streaming tile override "keys,warps,stages", for device sweeps (one process per tile)
_TILE_OVERRIDE = os.environ.get("FASTFOCAL_ATTN_TILE")
# key block of a streaming step (T <= 16 queries); read at each launch (fastfocal.tactics times 32)
STREAM_KEYS = 64

_LUTS: dict = {}


def bucket_lut(num_buckets: int, max_distance: int, device) -> Tensor:
    """int32 buckets of offsets -max_distance..max_distance (cached per device)."""
    key = (str(device), num_buckets, max_distance)
    if key not in _LUTS:
        rel = torch.arange(-max_distance, max_distance + 1, device=device)
        _LUTS[key] = relative_bucket_ref(rel, num_buckets, max_distance).to(torch.int32).contiguous()
    return _LUTS[key]


@triton.jit
def _scores(q, k, koff, kvalid, qoff, gate, tab_ptr, h, H, scale_log2e, lo_off, hi_off,
            MD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """log2-scaled scores of one key block with bias and mask (-inf where not allowed).
    Positions are int32 offsets from the row's start (a [BLOCK_M, BLOCK_N] int64 tile spills)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2e
    rel = tl.minimum(tl.maximum(koff[None, :] - qoff[:, None], -MD), MD)
    bias = tl.load(tab_ptr + (rel + MD) * H + h).to(tl.float32)
    s += gate[:, None] * bias * 1.4426950408889634
    ok = kvalid[None, :]
    if CAUSAL:
        ok = ok & (koff[None, :] < hi_off[:, None]) & (koff[None, :] >= lo_off[:, None])
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: m_i starts at -1e30
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision=PREC)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _attn_kernel(
    qkv_ptr, qkv_sb, qkv_st, y_ptr, y_sb, y_st,
    gw_ptr, gb_ptr, gc_ptr, tab_ptr,
    kr_ptr, vr_ptr, idx_ptr, start_ptr, out_ptr,
    T, R, H, scale_log2e,
    D: tl.constexpr, MD: tl.constexpr, CHUNK: tl.constexpr, WINDOW: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_RING: tl.constexpr, WRITE_RING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    # (batch row, head) on grid axis 0: 4096 streams x 16 heads overflow axis 1 (max 65535)
    pid_m = tl.program_id(1)
    b = (tl.program_id(0) // H).to(tl.int64)
    h = tl.program_id(0) % H
    C = H * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    mmask = offs_m < T
    rowp = qkv_ptr + b * qkv_sb + offs_m[:, None] * qkv_st + h * D + offs_d[None, :]
    qm = mmask[:, None] & dmask[None, :]
    q = tl.load(rowp, mask=qm, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    # gate: two groups of 4 linear outputs on the head's features, summed, then sigmoid
    yv = tl.load(y_ptr + b * y_sb + offs_m[:, None] * y_st + h * D + offs_d[None, :], mask=qm, other=0.0).to(tl.float32)
    ga = tl.zeros([BLOCK_M], dtype=tl.float32)
    gb = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in tl.static_range(8):
        w = tl.load(gw_ptr + i * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        g = tl.sum(yv * w[None, :], 1) + tl.load(gb_ptr + i).to(tl.float32)
        if i < 4:
            ga += g
        else:
            gb += g
    ga = 1.0 / (1.0 + tl.exp(-ga))
    gb = 1.0 / (1.0 + tl.exp(-gb))
    gate = ga * (gb * tl.load(gc_ptr + h).to(tl.float32) - 1.0) + 2.0

    if HAS_RING:
        start = tl.load(start_ptr + b)
        slot = tl.load(idx_ptr + b).to(tl.int64)
    else:
        start = b * 0
        slot = b * 0
    qpos = start + offs_m
    # query p sees keys in [e - WINDOW, e), e = end of p's chunk; as offsets from start
    hi_off = ((qpos // CHUNK + 1) * CHUNK - start).to(tl.int32)
    lo_off = hi_off - WINDOW

    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    first = start + pid_m * BLOCK_M
    e_first = (first // CHUNK + 1) * CHUNK
    if HAS_RING:
        if e_first - WINDOW < start:
            ring = slot * H * R * D + h * R * D
            sm = (start % R).to(tl.int32)
            before = tl.minimum(start, 1 << 30).to(tl.int32)  # frames that exist before start
            for n0 in range(0, R, BLOCK_N):
                r = n0 + tl.arange(0, BLOCK_N)
                rmask = r < R
                koff = (r - sm + R) % R - R  # slot r holds position start + koff
                kvalid = rmask & (koff >= -before)
                kp = ring + r[:, None] * D + offs_d[None, :]
                km = rmask[:, None] & dmask[None, :]
                k = tl.load(kr_ptr + kp, mask=km, other=0.0)
                v = tl.load(vr_ptr + kp, mask=km, other=0.0)
                if DOT_F32:
                    k = k.to(tl.float32)
                s = _scores(q, k, koff, kvalid, offs_m, gate, tab_ptr, h, H, scale_log2e, lo_off, hi_off, MD, CAUSAL, PREC)
                m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, PREC, DOT_F32)

    if CAUSAL:
        last = tl.minimum(first + BLOCK_M, start + T) - 1
        lo = tl.maximum(e_first - WINDOW - start, 0).to(tl.int32)
        hi = tl.minimum((last // CHUNK + 1) * CHUNK - start, T).to(tl.int32)
    else:
        lo = 0
        hi = T
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        jmask = j < hi
        kp = qkv_ptr + b * qkv_sb + j[:, None] * qkv_st + h * D + offs_d[None, :]
        km = jmask[:, None] & dmask[None, :]
        k = tl.load(kp + C, mask=km, other=0.0)
        v = tl.load(kp + 2 * C, mask=km, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = _scores(q, k, j, jmask, offs_m, gate, tab_ptr, h, H, scale_log2e, lo_off, hi_off, MD, CAUSAL, PREC)
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, PREC, DOT_F32)

    l_i = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_i[:, None]
    tl.store(out_ptr + b * T * C + offs_m[:, None] * C + h * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=qm)

    if WRITE_RING:
        # every ring read of this (slot, head) row happened above, in this program
        tl.debug_barrier()
        wm = qm & (offs_m >= T - R)[:, None]
        rp = slot * H * R * D + h * R * D + ((qpos % R) * D)[:, None] + offs_d[None, :]
        kn = tl.load(rowp + C, mask=wm, other=0.0)
        vn = tl.load(rowp + 2 * C, mask=wm, other=0.0)
        tl.store(kr_ptr + rp, kn.to(kr_ptr.dtype.element_ty), mask=wm)
        tl.store(vr_ptr + rp, vn.to(vr_ptr.dtype.element_ty), mask=wm)


def rel_attention(
    qkv: Tensor,
    y: Tensor,
    gru_w: Tensor,
    gru_b: Tensor,
    gru_const: Tensor,
    rel_emb: Tensor,
    num_heads: int,
    start: Tensor,
    chunk: int,
    window: int | None,
    num_buckets: int,
    max_distance: int,
    k_ring: Tensor | None = None,
    v_ring: Tensor | None = None,
    idx: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Triton launcher; same contract as `rel_attention_ref` (rings updated in place)."""
    B, T, C3 = qkv.shape
    H = num_heads
    C = C3 // 3
    D = C // H
    check(C3 == 3 * C and C == H * D, f"qkv last dim must be 3 * heads * d, got {C3} for {H} heads")
    check(qkv.stride(2) == 1 and y.stride(2) == 1 and tuple(y.shape) == (B, T, C), "qkv (B, T, 3C) and y (B, T, C) need unit channel stride")
    check(tuple(gru_w.shape) == (8, D) and gru_w.is_contiguous() and gru_b.shape == (8,), f"gru_rel_pos_linear must be (8, {D})")
    check(gru_const.numel() == H and rel_emb.shape == (num_buckets, H) and rel_emb.is_contiguous(), "gru_rel_pos_const (H) / relative_embedding (num_buckets, H)")
    has_ring = k_ring is not None
    if has_ring:
        R = k_ring.shape[2]
        check(window is not None, "rings exist only for the causal form")
        check(k_ring.shape == v_ring.shape and k_ring.shape[1:] == (H, R, D) and k_ring.is_contiguous() and v_ring.is_contiguous(),
              f"rings must be contiguous (S, {H}, R, {D}), got {tuple(k_ring.shape)}")
        check(idx is not None and idx.shape == (B,) and start.shape == (B,), "rings need idx (B,) and start (B,)")
        check_device(qkv, y, k_ring, v_ring, idx, start, rel_emb)
    else:
        R = 1
        check_device(qkv, y, rel_emb)
    # E[bucket(offset), h] for every offset in [-max_distance, max_distance]: one gather per
    # score instead of two dependent ones (bucket, then embedding); the same values
    tab = derived(rel_emb, ("bias_by_offset", num_buckets, max_distance),
                  lambda e: e[bucket_lut(num_buckets, max_distance, e.device).long()].contiguous())
    out = out_or_new(out, (B, T, C), qkv.dtype, qkv.device)
    # from ptxas on sm_90 (tests/kernels/sm90_compile.py): at 64 queries (long inputs) 64-key
    # blocks need 229-255 registers and spill, so those take 32-key blocks (157 with 8 warps)
    block_m = 16 if T <= 16 else 64
    block_n, warps, stages = 32, 8, 3
    if T <= 16:
        # a streaming step reads its K/V rings (bandwidth-bound): 64-key blocks, cp.async 3 stages
        # deep, take 75 registers (bf16; 32-key blocks took 94) and 39 KB of shared memory, so
        # 3 programs fit an SM instead of 2, with 96 KB of K/V in flight per SM instead of 32
        # (Little's law at 4.3 TB/s wants ~50 KB). Untimed: FASTFOCAL_ATTN_TILE="keys,warps,stages"
        # overrides it for the GPU sweep.
        block_n = STREAM_KEYS
    if _TILE_OVERRIDE and T <= 16 and not INTERPRET:
        block_n, warps, stages = (int(v) for v in _TILE_OVERRIDE.split(","))
    n_m = triton.cdiv(T, block_m)
    write_ring = has_ring and n_m == 1
    # fp32: IEEE (the exact path) or the split product `_common.f32_dot` names; bf16/fp16 use
    # tensor cores. The interpreter's bf16 dot is broken, so there everything goes through fp32.
    prec = _common.dot_precision(qkv.dtype)
    _attn_kernel[(B * H, n_m)](
        qkv, qkv.stride(0), qkv.stride(1), y, y.stride(0), y.stride(1),
        gru_w, gru_b, gru_const.reshape(-1), tab,
        k_ring if has_ring else qkv, v_ring if has_ring else qkv, idx if has_ring else qkv,
        start if has_ring else qkv, out, T, R, H, LOG2E / math.sqrt(D),
        D=D, MD=max_distance, CHUNK=chunk, WINDOW=window or 0, CAUSAL=window is not None,
        HAS_RING=has_ring, WRITE_RING=write_ring, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(D),
        PREC=prec, DOT_F32=INTERPRET or qkv.dtype == torch.float32, num_warps=warps, num_stages=stages,
        **launch_opts(qkv),
    )
    if has_ring and not write_ring:
        write_kv_ring(qkv, start, k_ring, v_ring, idx, H)
    return out


def write_kv_ring(qkv: Tensor, start: Tensor, k_ring: Tensor, v_ring: Tensor, idx: Tensor, H: int) -> None:
    """The ring keeps the newest R frames of this layer's keys and values."""
    B, T, C3 = qkv.shape
    R = k_ring.shape[2]
    kv = qkv.view(B, T, 3, H, -1)
    m = min(T, R)
    slots = torch.remainder(start[:, None] + torch.arange(T - m, T, device=qkv.device)[None, :], R)
    rows = idx[:, None].expand(B, m)
    k_ring[rows, :, slots] = kv[:, T - m:, 1].to(k_ring.dtype)
    v_ring[rows, :, slots] = kv[:, T - m:, 2].to(v_ring.dtype)


# --------------------------------------------------------------------------- reference
def relative_bucket_ref(rel: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """WavLM bidirectional relative position bucket of integer offsets rel = key - query."""
    n = num_buckets // 2
    out = (rel > 0).long() * n
    r = rel.abs()
    max_exact = n // 2
    large = max_exact + (
        torch.log(r.float() / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).long()
    large = torch.clamp(large, max=n - 1)
    return out + torch.where(r < max_exact, r, large)


def attention_gate_ref(y: Tensor, gru_w: Tensor, gru_b: Tensor, gru_const: Tensor, num_heads: int) -> Tensor:
    """Per-head gate of the gated relative position bias. y (B, T, C) -> (B, H, T) float32."""
    B, T, C = y.shape
    yh = y.view(B, T, num_heads, C // num_heads).transpose(1, 2)  # B H T d
    g = F.linear(yh, gru_w, gru_b).view(B, num_heads, T, 2, -1).sum(-1)
    g = torch.sigmoid(g.float())
    a, b = g[..., 0], g[..., 1]
    return a * (b * gru_const.view(1, num_heads, 1).float() - 1.0) + 2.0


def ring_positions(start: Tensor, R: int) -> Tensor:
    """Absolute position held by each ring slot (B, R) when frame `start` is next: slot
    p mod R holds frame p; negative before the ring has filled."""
    r = torch.arange(R, device=start.device)
    return start[:, None] - R + torch.remainder(r[None, :] - start[:, None], R)


def rel_bias_ref(rel_emb, q_pos, k_pos, k_valid, chunk, window, num_buckets, max_distance):
    """The ungated bucketed bias (B, H, Tq, Tk) float32 and where each query may see each key
    (B, Tq, Tk) bool. Causal (window not None): query p sees keys j with e - window <= j < e,
    e = chunk * (p // chunk + 1); k_valid (B, Tk) bool or None."""
    rel = k_pos[:, None, :] - q_pos[:, :, None]  # B Tq Tk
    bias = F.embedding(relative_bucket_ref(rel, num_buckets, max_distance), rel_emb.float()).permute(0, 3, 1, 2)
    allowed = torch.ones_like(rel, dtype=torch.bool)
    if window is not None:
        e = (q_pos // chunk + 1) * chunk
        allowed = (k_pos[:, None, :] < e[:, :, None]) & (k_pos[:, None, :] >= e[:, :, None] - window)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    return bias, allowed


def gated_rel_attention_ref(q, k, v, gate, rel_emb, q_pos, k_pos, k_valid, chunk, window, num_buckets, max_distance):
    """One block of queries against the given keys, with the bias and mask built explicitly.

    q (B, H, Tq, d); k, v (B, H, Tk, d); gate (B, H, Tq) float32; q_pos (B, Tq), k_pos (B, Tk)
    absolute positions; k_valid and the window as in `rel_bias_ref`.
    """
    bias, allowed = rel_bias_ref(rel_emb, q_pos, k_pos, k_valid, chunk, window, num_buckets, max_distance)
    bias = (bias * gate.unsqueeze(-1)).masked_fill(~allowed.unsqueeze(1), float("-inf"))  # B H Tq Tk
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def _join_ring(ring: Tensor, idx: Tensor, new: Tensor) -> Tensor:
    """[ring rows idx ‖ new] along time (B, H, R + T, d). The rows are gathered straight into
    the result: one pass over the ring instead of two (index_select, then cat)."""
    if ring.dtype != new.dtype or torch.compiler.is_exporting():  # exporters want the plain form
        return torch.cat([ring.index_select(0, idx).to(new.dtype), new], 2)
    B, H, T, d = new.shape
    R = ring.shape[2]
    out = new.new_empty(B, H, R + T, d)
    torch.index_select(ring, 0, idx, out=out[:, :, :R])
    out[:, :, R:] = new
    return out


def ring_key_positions(start: Tensor, R: int, q_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Absolute positions (B', R + T) of the keys [ring slots ‖ new frames] and which are valid
    (slots before frame 0 are not), for rows starting at `start` (B',) with query positions
    q_pos (B', T); B' may be 1 for rows sharing a start."""
    ring_pos = ring_positions(start, R)
    return torch.cat([ring_pos, q_pos], 1), torch.cat([ring_pos >= 0, torch.ones_like(q_pos, dtype=torch.bool)], 1)


def ring_keys(k_ring: Tensor, v_ring: Tensor, idx: Tensor, k: Tensor, v: Tensor, start: Tensor,
              q_pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keys and values [ring rows idx ‖ new frames] (B, H, R + T, d) and `ring_key_positions`."""
    return (_join_ring(k_ring, idx, k), _join_ring(v_ring, idx, v), *ring_key_positions(start, k_ring.shape[2], q_pos))


def rel_attention_ref(
    qkv: Tensor,
    y: Tensor,
    gru_w: Tensor,
    gru_b: Tensor,
    gru_const: Tensor,
    rel_emb: Tensor,
    num_heads: int,
    start: Tensor,
    chunk: int,
    window: int | None,
    num_buckets: int,
    max_distance: int,
    k_ring: Tensor | None = None,
    v_ring: Tensor | None = None,
    idx: Tensor | None = None,
) -> Tensor:
    """WavLM self-attention core: qkv (B, T, 3C) = [q | k | v] projections of y = LN(x),
    start (B,) absolute position of frame 0. Causal (window given): sliding window over
    4-frame chunks; streaming reads rows idx of the K/V rings (S, H, R, d) and writes the new
    frames into them. Returns the heads' outputs (B, T, C) before out_proj.
    """
    B, T, C3 = qkv.shape
    H = num_heads
    C = C3 // 3
    d = C // H
    q_pos = start[:, None] + torch.arange(T, device=qkv.device)[None, :]
    qkv = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # B H T d
    gate = attention_gate_ref(y, gru_w, gru_b, gru_const, H)

    R0 = 0
    keys, vals, k_pos, k_valid = k, v, q_pos, None
    if k_ring is not None:
        R = k_ring.shape[2]
        R0 = R
        keys, vals, k_pos, k_valid = ring_keys(k_ring, v_ring, idx, k, v, start, q_pos)
        # the ring keeps the newest R frames of this layer's keys and values
        m = min(T, R)
        slots = torch.remainder(q_pos[:, T - m:], R)
        rows = idx[:, None].expand(B, m)
        k_ring[rows, :, slots] = k[:, :, T - m:].transpose(1, 2).to(k_ring.dtype)
        v_ring[rows, :, slots] = v[:, :, T - m:].transpose(1, 2).to(v_ring.dtype)

    outs = []
    for a in range(0, T, ATTN_BLOCK):
        b = min(T, a + ATTN_BLOCK)
        if window is not None:
            lo_new = a - window  # superset of the window; the mask is exact
            lo = R0 + lo_new if lo_new >= 0 else 0
            hi = R0 + min(T, b + chunk)
        else:
            lo, hi = 0, keys.shape[2]
        outs.append(
            gated_rel_attention_ref(
                q[:, :, a:b], keys[:, :, lo:hi], vals[:, :, lo:hi], gate[:, :, a:b], rel_emb,
                q_pos[:, a:b], k_pos[:, lo:hi], None if k_valid is None else k_valid[:, lo:hi],
                chunk, window, num_buckets, max_distance,
            )
        )
    o = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    return o.transpose(1, 2).reshape(B, T, C)
