"""CPU forms of the two streaming ops whose references move the most state per step.

A voice app steps one stream on a CPU: batch 1, 4 frames. There the references in
`fastfocal.kernels` spend more time copying state than computing. The attention reference
gathers each layer's K/V rings and joins them with the new frames before SDPA (two copies
of 2 MB per layer in fp32) and rebuilds the relative-position bias in every layer. The focal
reference gathers each level's window out of its ring by an index per frame. These forms
compute the same thing with less traffic:

- attention reads the rings in place: scores against the ring and against the new frames
  are two matmuls, softmax runs over both, and the output is two matmuls. Scores, bias and
  softmax are fp32 in every dtype. The bucketed bias and the window mask depend only on positions,
  so they are built once per step (`memo`) and each layer scales them by its gate;
- the focal levels read each level's window out of its ring as (at most two) slices when
  the rows share a ring phase (one stream always does), in place for idx None (every slot in
  order), and write back only the step's frames; the ConvNeXt dwconv + LayerNorm reads and
  writes its (shift) cache in place likewise. Both compute in fp32 in every dtype: on CPU the
  references run these convs in fp32 anyway, so bf16 only loses the casts around them.

`fastfocal.ops` picks these on CPU. FASTFOCAL_BACKEND=torch takes the plain references,
which is how the tests compare the two.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels._common import float32_weight
from .kernels.attention import (ATTN_BLOCK, attention_gate_ref, rel_bias_ref, ring_key_positions, ring_keys,
                                write_kv_ring)
from .kernels.focal_context import ring_window, ring_write
from .state import all_rows

log = logging.getLogger("fastfocal")
MAX_STEP_FRAMES = 64  # attention: scores are (B, H, T, R + T) fp32; longer runs take the reference
_NATIVE: dict = {}


_MALLOC: list = []  # [applied?], once per process
TRIM_BYTES = 1 << 30  # free heap kept at the top before it goes back to the OS


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of unmapping it. By default each
    allocation above 32 MB (an offline encode's feature-extractor activations: 65-98 MB a
    10 s clip) is a fresh mmap, so every call page-faults and zeroes it again: 25 ms against
    4 for a 65 MB fill, ~20% of a 10 s CPU encode. With mmap off and a 1 GiB trim threshold
    they come from the heap and are reused. The process keeps up to TRIM_BYTES of freed
    memory (as PyTorch's CUDA allocator keeps its cache). Applied once per process, when a
    CPU model is built; FASTFOCAL_MALLOC=system keeps the C library's defaults. Returns
    whether it applied (glibc only)."""
    if _MALLOC:
        return _MALLOC[0]
    ok = False
    if os.environ.get("FASTFOCAL_MALLOC", "").lower() != "system" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(None)
            M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
            ok = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
        except (OSError, AttributeError):
            ok = False
        log.debug("glibc malloc: mmap off, trim threshold %d: %s", TRIM_BYTES, "applied" if ok else "refused")
    _MALLOC.append(ok)
    return ok


def native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` natively: oneDNN packs it (asked once, with a tiny
    weight; its bf16 reorder raises without AVX-512 BW/VL/DQ or AVX-NE-CONVERT). fp32 always."""
    if dtype == torch.float32:
        return True
    ok = _NATIVE.get(dtype)
    if ok is None:
        try:
            with torch.inference_mode(False), torch.no_grad():
                w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 2)
                torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), w, None, "none", [], "")
            ok = True
        except (RuntimeError, AttributeError):
            ok = False
        _NATIVE[dtype] = ok
    return ok


_FP16_GEMM: list = []


def fp16_weight_gemm() -> bool:
    """Whether FBGEMM's fp16-weight GEMM runs here (x86 builds): fp32 activations and
    accumulation on weights stored as fp16, converted in registers. Where the CPU has no
    native bf16 it is the bf16/fp16 Linear: it reads 2 bytes a weight, as bf16 would, and on
    a 2-core AVX2 EPYC ran a 4-row 1024x4096 matmul from a cold cache in 0.80 ms against
    2.07 ms for oneDNN's fp32 packed weight (1x4096x4096: 2.29 against 5.29 ms)."""
    if not _FP16_GEMM:
        try:
            with torch.inference_mode(False), torch.no_grad():
                p = torch.ops.quantized.linear_prepack_fp16(torch.eye(8), None)
                ok = torch.equal(torch.ops.quantized.linear_dynamic_fp16(torch.ones(2, 8), p), torch.ones(2, 8))
        except (RuntimeError, AttributeError):
            ok = False
        _FP16_GEMM.append(ok)
    return _FP16_GEMM[0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a CPU matmul of `dtype` computes in: its own, or fp32 where the CPU has no native
    form (there bf16 matmuls and bmm's measured 1.4-8x slower than fp32 ones on an AVX2 machine;
    one rounding at the end instead)."""
    return dtype if native(dtype) else torch.float32


def _window_bias(start: Tensor, T: int, R: int, chunk: int, window: int, rel_emb: Tensor, num_buckets: int,
                 max_distance: int) -> tuple[Tensor, Tensor]:
    """Key order [ring slot 0..R-1 ‖ new frames]: the bucketed bias (B, H, T, R+T) fp32 and an
    additive mask (B, 1, T, R+T), 0 where a query sees the key, -inf elsewhere."""
    q_pos = start[:, None] + torch.arange(T, device=start.device)[None, :]
    return _bias_and_mask(rel_emb, q_pos, *ring_key_positions(start, R, q_pos), chunk, window, num_buckets, max_distance)


def _bias_and_mask(rel_emb, q_pos, k_pos, k_valid, chunk, window, num_buckets, max_distance) -> tuple[Tensor, Tensor]:
    """`rel_bias_ref`'s bias (B, H, Tq, Tk) fp32, contiguous, and its mask as an additive
    (B, 1, Tq, Tk) fp32 tensor: 0 where a query sees a key, -inf elsewhere."""
    bias, ok = rel_bias_ref(rel_emb, q_pos, k_pos, k_valid, chunk, window, num_buckets, max_distance)
    mask = torch.zeros(ok.shape, dtype=torch.float32, device=q_pos.device).masked_fill_(~ok, float("-inf"))
    return bias.contiguous(), mask.unsqueeze(1)


def _common_start(start: Tensor) -> int | None:
    """The rows' common start (one host read), or None when they differ."""
    s0 = int(start[0])
    return s0 if start.shape[0] == 1 or bool((start == s0).all()) else None


def rel_attention_step(qkv: Tensor, y: Tensor, gru_w: Tensor, gru_b: Tensor, gru_const: Tensor, rel_emb: Tensor,
                       num_heads: int, start: Tensor, chunk: int, window: int, num_buckets: int, max_distance: int,
                       k_ring: Tensor, v_ring: Tensor, idx: Tensor | None, memo: dict | None) -> Tensor:
    """`rel_attention_ref` for a causal streaming step (T <= MAX_STEP_FRAMES) without joining
    the rings to the new frames; idx None reads the rings in place. memo: a dict shared by
    the layers of one step (same positions), or None."""
    B, T, C3 = qkv.shape
    H = num_heads
    C = C3 // 3
    d = C // H
    R = k_ring.shape[2]
    key = ("window_bias", T, R, rel_emb.data_ptr())  # the model shares one embedding across layers
    if memo is not None and key in memo:
        bias, mask = memo[key]
    else:
        bias, mask = _window_bias(start, T, R, chunk, window, rel_emb, num_buckets, max_distance)
        if memo is not None:
            memo[key] = (bias, mask)
    cd = compute_dtype(k_ring.dtype)
    kv = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).to(k_ring.dtype).to(cd)  # 3 B H T d (ring-rounded)
    q, k, v = kv[0], kv[1], kv[2]
    kr = (k_ring if idx is None else k_ring.index_select(0, idx)).to(cd)
    vr = (v_ring if idx is None else v_ring.index_select(0, idx)).to(cd)
    gate = attention_gate_ref(y, gru_w, gru_b, gru_const, H)  # B H T fp32
    # the matmuls read the rings in their dtype (fp32 accumulation inside); scores, bias and
    # softmax in fp32 (the reference rounds the bias to the compute dtype)
    # fp32: the ring as the GEMM's first operand (K q^T, then a transposed view) measured 327 -> 214 us
    # a layer from a cold cache (16 heads x 508 keys); bf16 gains nothing from it
    ring_s = torch.matmul(kr, q.transpose(2, 3)).transpose(2, 3) if cd == torch.float32 else torch.matmul(q, kr.transpose(2, 3))
    s = torch.cat([ring_s, torch.matmul(q, k.transpose(2, 3))], 3).float()
    s = torch.addcmul(mask, bias, gate.unsqueeze(-1)).add_(s, alpha=d ** -0.5)
    p = torch.softmax(s, dim=-1).to(vr.dtype)
    o = torch.matmul(p[..., :R], vr).add_(torch.matmul(p[..., R:], v))  # B H T d
    # the ring keeps the newest R frames (written after the reads above: they may overwrite them)
    write_kv_ring(qkv, start, k_ring, v_ring, all_rows(idx, B, qkv.device), H)
    return o.transpose(1, 2).reshape(B, T, C).to(qkv.dtype)


def rel_attention_long(qkv: Tensor, y: Tensor, gru_w: Tensor, gru_b: Tensor, gru_const: Tensor, rel_emb: Tensor,
                       num_heads: int, start: Tensor, chunk: int, window: int, num_buckets: int, max_distance: int,
                       k_ring: Tensor, v_ring: Tensor, idx: Tensor | None, memo: dict | None) -> Tensor:
    """`rel_attention_ref` for a long causal run over the rings (offline segments): the same
    query blocks and the same scores, but each block's bucketed bias and window mask are
    built once for all layers (memo) and, when the rows share a start (always, offline), once
    for all rows; the reference rebuilds them (B, H, Tq, Tk) in every layer. Ring keys no row
    can see yet (a fresh state: every offline run's first segment) are left out of the
    scores instead of masked."""
    B, T, C3 = qkv.shape
    H = num_heads
    C = C3 // 3
    d = C // H
    rows = all_rows(idx, B, qkv.device)
    s0 = _common_start(start)
    pos_rows = start[:1] if s0 is not None else start
    q_pos = pos_rows[:, None] + torch.arange(T, device=qkv.device)[None, :]
    x = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = x[0], x[1], x[2]  # B H T d
    gate = attention_gate_ref(y, gru_w, gru_b, gru_const, H)
    R = k_ring.shape[2]
    if s0 == 0:  # every ring slot is before frame 0: no key there is visible
        R0, keys, vals, k_pos, k_valid = 0, k, v, q_pos, None
    else:
        R0 = R
        keys, vals, k_pos, k_valid = ring_keys(k_ring, v_ring, rows, k, v, pos_rows, q_pos)
    write_kv_ring(qkv, start, k_ring, v_ring, rows, H)  # after the reads: it may overwrite them
    outs = []
    for a in range(0, T, ATTN_BLOCK):
        b = min(T, a + ATTN_BLOCK)
        lo = R0 + a - window if a - window >= 0 else 0  # as the reference: a superset, the mask is exact
        hi = R0 + min(T, b + chunk)
        key = ("long_bias", a, b, lo, hi, R0, rel_emb.data_ptr())
        if memo is not None and key in memo:
            bias, mask = memo[key]
        else:
            bias, mask = _bias_and_mask(rel_emb, q_pos[:, a:b], k_pos[:, lo:hi],
                                        None if k_valid is None else k_valid[:, lo:hi], chunk, window, num_buckets,
                                        max_distance)
            if memo is not None:
                memo[key] = (bias, mask)
        # bias * gate, then the mask added (x + 0 == x, x + -inf == -inf): the reference's
        # masked_fill of the gated bias, bit for bit
        m = torch.addcmul(mask, bias, gate[:, :, a:b].unsqueeze(-1))
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], keys[:, :, lo:hi], vals[:, :, lo:hi],
                                                   attn_mask=m.to(q.dtype)))
    o = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    return o.transpose(1, 2).reshape(B, T, C)


def _joined(buf: Tensor, idx: Tensor | None, x: Tensor) -> Tensor:
    """[cache rows ‖ x] (B, C, P+T) in fp32 for x (B, C, T) and a shift cache (B, C, P): one
    pass over the cache (read in place for idx None). The cache is written with the last P
    frames at once: the result is a copy, so the conv may follow."""
    B, C, T = x.shape
    P = buf.shape[2]
    xp = x.new_empty(B, C, P + T, dtype=torch.float32)
    xp[:, :, :P] = buf if idx is None else buf.index_select(0, idx)
    xp[:, :, P:] = x
    if idx is None:
        buf.copy_(xp[:, :, T:])
    else:
        buf.index_copy_(0, idx, xp[:, :, T:].to(buf.dtype))
    return xp


def _f32(w: Tensor | None) -> Tensor | None:
    return None if w is None else float32_weight(w)


def _depthwise(xp: Tensor, w: Tensor, b: Tensor | None, exact: bool) -> Tensor:
    """Depthwise conv1d of xp (B, C, L) by w (C, 1, k) (+ b) -> (B, C, L - k + 1). For a few output
    frames (a batch-1 step) the library conv's per-call set-up is most of its cost: there one
    batched matmul over the windows (a view of xp) is 2-5x faster for short kernels; beyond it the
    conv wins (at 512 taps too). Its sums round in another order, so `exact` (a float32 model:
    bit for bit the reference's conv) keeps the conv."""
    B, C, L = xp.shape
    k = w.shape[-1]
    T = L - k + 1
    if exact or B * T > 4 or k > 32 or xp.dtype != torch.float32 or w.dtype != torch.float32:
        return F.conv1d(xp, w, b, groups=C)
    win = xp.transpose(0, 1).unfold(2, k, 1).reshape(C, B * T, k)
    if b is None:
        y = torch.bmm(win, w.view(C, k, 1))
    else:
        y = torch.baddbmm(b.view(C, 1, 1), win, w.view(C, k, 1))
    return y.view(C, B, T).transpose(0, 1)


def _spans(f0: int, n: int, R: int) -> list[tuple[int, int, int]]:
    """Frames f0 .. f0+n-1 (f0 >= 0) of a ring of R slots as (slot lo, slot hi, offset) pieces."""
    a = f0 % R
    first = min(n, R - a)
    return [(a, a + first, 0)] + ([(0, n - first, first)] if n > first else [])


def _ring_joined(buf: Tensor, idx: Tensor | None, start: Tensor, s0: int | None, x: Tensor, P: int) -> Tensor:
    """[frames start-P .. start-1 ‖ x] (B, C, P+T) in fp32 for x (B, C, T), from ring rows idx
    (every row for None; frames before 0 are frame 0, a fresh row's x's first), then x's frames
    written into the ring. s0: the rows' common start, read slices in place; None: starts differ."""
    B, C, T = x.shape
    R = buf.shape[2]
    xp = x.new_empty(B, C, P + T, dtype=torch.float32)
    left = xp[:, :, :P]
    xp[:, :, P:] = x
    if s0 is None:
        rows = all_rows(idx, B, x.device)
        left.copy_(torch.where((start == 0)[:, None, None], x[:, :, :1].float(), ring_window(buf, rows, start, P).float()))
        ring_write(buf, rows, start, x)
        return xp
    rows = slice(None) if idx is None else idx
    if s0 == 0:
        left.copy_(x[:, :, :1].expand(-1, -1, P))
    else:
        lead = max(P - s0, 0)  # frames before the stream's first: its first (slot 0)
        if lead:
            left[:, :, :lead] = buf[rows, :, :1]
        for lo, hi, off in _spans(max(s0 - P, 0), P - lead, R):
            left[:, :, lead + off:lead + off + hi - lo] = buf[rows, :, lo:hi]
    m = min(T, R)
    for lo, hi, off in _spans(s0 + T - m, m, R):
        buf[rows, :, lo:hi] = x[:, :, T - m + off:T - m + off + hi - lo].to(buf.dtype)
    return xp


def focal_context_stream(ctx: Tensor, gates: Tensor, weights: list[Tensor], biases: list[Tensor],
                         caches: list[Tensor], idx: Tensor | None, start: Tensor) -> Tensor:
    """`focal_context_ref` of the causal form with rings, each level's input built by
    `_ring_joined`. Computed in fp32 in every dtype: the reference runs its convs in fp32 on
    CPU anyway (`grouped_conv1d`), so this only drops its casts; the rings keep their dtype."""
    s0 = _common_start(start)  # once per layer, shared by its levels
    c = ctx.transpose(1, 2).float()  # B C T
    acc = None
    exact = ctx.dtype == torch.float32
    for lvl, (w, b, buf) in enumerate(zip(weights, biases, caches)):
        c = F.gelu(_depthwise(_ring_joined(buf, idx, start, s0, c, w.shape[-1] - 1), _f32(w), _f32(b), exact))
        term = c * gates[:, :, lvl].float().unsqueeze(1)
        acc = term if acc is None else acc.add_(term)
    return acc.transpose(1, 2).to(ctx.dtype)


def dwconv_layer_norm_stream(x: Tensor, weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                             cache: Tensor, idx: Tensor | None) -> Tensor:
    """`dwconv_layer_norm_ref` of the causal form with a cache (zero-free: the cache holds the
    left context), in fp32 like the reference's conv on CPU."""
    C = x.shape[2]
    h = _depthwise(_joined(cache, idx, x.transpose(1, 2)), _f32(weight), _f32(bias), x.dtype == torch.float32).transpose(1, 2)
    return F.layer_norm(h, (C,), _f32(ln_weight), _f32(ln_bias), eps).to(x.dtype)
