"""ConvNeXt front: depthwise conv (7 taps) + LayerNorm over channels, one pass.

x is time-major (B, T, C). Causal: left pad K-1 from the block's cache (S, C, K-1), rows
picked by a slot index; the cache starts as zeros (WaveNeXt pads with zeros, not by
replication) and offline is the same with no cache. Non-causal ("same", Vocos): zeros on both
sides. A program owns a tile of frames with all channels (the LayerNorm needs whole rows).
A streaming step is one tile, so that program also shifts the cache in place (BLOCK_T slots
at a time); longer inputs
copy their last K-1 frames into the cache after the kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import TILE, check, check_device, grouped_conv1d, launch_opts, out_or_new, pdl_wait, pow2



@triton.jit
def _dwconv_ln_kernel(x_ptr, w_ptr, b_ptr, lw_ptr, lb_ptr, cache_ptr, idx_ptr, out_ptr, T, C, eps,
                      K: tl.constexpr, PADL: tl.constexpr, HAS_CACHE: tl.constexpr, WRITE_CACHE: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # axis 1 < 65536: T < 500k frames
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    tm = t < T
    m = tm[:, None] & cm[None, :]
    xb = x_ptr + b * T * C
    if HAS_CACHE:
        cb = cache_ptr + tl.load(idx_ptr + b).to(tl.int64) * C * (K - 1)
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):
        tau = t + j - PADL
        v = tl.load(xb + tau[:, None] * C + c[None, :], mask=m & ((tau >= 0) & (tau < T))[:, None], other=0.0).to(tl.float32)
        if HAS_CACHE:
            ci = tl.minimum(tl.maximum(tau + K - 1, 0), K - 2)
            v += tl.load(cb + c[None, :] * (K - 1) + ci[:, None], mask=m & (tau < 0)[:, None], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c * K + j, mask=cm, other=0.0).to(tl.float32)
        acc += v * w[None, :]
    acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(tl.where(m, acc, 0.0), 1) / C
    d = tl.where(m, acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
    lw = tl.load(lw_ptr + c, mask=cm, other=0.0).to(tl.float32)
    lb = tl.load(lb_ptr + c, mask=cm, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * lw[None, :] + lb[None, :]
    tl.store(out_ptr + b * T * C + t[:, None] * C + c[None, :], y.to(out_ptr.dtype.element_ty), mask=m)
    if WRITE_CACHE:
        # one tile holds the whole step: cache <- last K-1 frames of [cache ‖ x], BLOCK_T slots
        # at a time (all reads first: the conv above read the old cache)
        tl.debug_barrier()
        for i0 in tl.static_range(0, K - 1, BLOCK_T):
            i = i0 + tl.arange(0, BLOCK_T)
            im = i < K - 1
            tau = i - (K - 1) + T
            cm2 = im[:, None] & cm[None, :]
            vn = tl.load(xb + tl.maximum(tau, 0)[:, None] * C + c[None, :], mask=cm2 & (tau >= 0)[:, None], other=0.0)
            vc = tl.load(cb + c[None, :] * (K - 1) + tl.minimum(i + T, K - 2)[:, None], mask=cm2 & (tau < 0)[:, None], other=0.0)
            v = tl.where((tau >= 0)[:, None], vn.to(tl.float32), vc.to(tl.float32))
            tl.debug_barrier()  # this chunk's reads (other threads) before its writes
            tl.store(cb + c[None, :] * (K - 1) + i[:, None], v.to(cache_ptr.dtype.element_ty), mask=cm2)


def dwconv_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                      causal: bool, cache: Tensor | None = None, idx: Tensor | None = None,
                      out: Tensor | None = None) -> Tensor:
    """Triton launcher; same contract as `dwconv_layer_norm_ref` (cache updated in place)."""
    B, T, C = x.shape
    K = weight.shape[-1]
    check(tuple(weight.shape) == (C, 1, K) and weight.is_contiguous() and bias.shape == (C,), f"depthwise weight must be contiguous ({C}, 1, K)")
    check(ln_weight.numel() == C and ln_bias.numel() == C, f"LayerNorm weight/bias of {C}")
    check(C <= 8192 and T >= 1, f"1..8192 channels and at least one frame, got C={C}, T={T}")
    x = x.contiguous()
    has_cache = cache is not None
    if has_cache:
        check(causal and K >= 2, "a cache needs the causal form and K >= 2")
        check(cache.dim() == 3 and cache.shape[1:] == (C, K - 1) and cache.is_contiguous(), f"cache must be contiguous (S, {C}, {K - 1})")
        check(idx is not None and idx.shape == (B,), "a cache needs idx (B,)")
        check_device(x, weight, cache, idx)
    else:
        check_device(x, weight)
    out = out_or_new(out, (B, T, C), x.dtype, x.device)
    bc = pow2(C)
    bt = min(pow2(T), max(1, TILE // bc))  # 4096 elements a program: 8192 spilled (sm_90, with a cache)
    # a long run over a cache (tiles that read it but do not write it) takes 8 warps: at 4, 4 x 1024
    # tiles spilled 192-208 bytes a thread under Triton 3.6, the device image's (none under 3.9)
    n_t = triton.cdiv(T, bt)
    check(n_t < 65536, f"at most {65535 * bt} frames per call, got {T}")
    write = has_cache and n_t == 1
    _dwconv_ln_kernel[(B, n_t)](
        x, weight, bias, ln_weight, ln_bias, cache if has_cache else x, idx if has_cache else x, out, T, C, float(eps),
        K=K, PADL=K - 1 if causal else (K - 1) // 2, HAS_CACHE=has_cache, WRITE_CACHE=write,
        BLOCK_T=bt, BLOCK_C=bc, num_warps=4 if bc * bt <= 4096 and (write or not has_cache) else 8, **launch_opts(x),
    )
    if has_cache and not write:  # the new cache: the last K-1 frames of [cache ‖ x] (after the launch read it)
        new = x[:, max(0, T - (K - 1)):].transpose(1, 2).to(cache.dtype)
        if T < K - 1:  # several time tiles of fewer frames than the cache holds (the device's tile at 1024 channels)
            new = torch.cat([cache.index_select(0, idx)[:, :, T:], new], 2)
        cache.index_copy_(0, idx, new)
    return out


def dwconv_layer_norm_ref(x: Tensor, weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                          causal: bool, cache: Tensor | None = None, idx: Tensor | None = None) -> Tensor:
    """x (B, T, C) -> LayerNorm(dwconv(x)); causal left pad K-1 with zeros or cache rows idx of
    (S, C, K-1), updated in place; non-causal 'same' zero padding."""
    xt = x.transpose(1, 2)
    k = weight.shape[-1]
    if causal:
        if cache is not None:
            left = cache.index_select(0, idx).to(xt.dtype)
        else:
            left = xt.new_zeros(xt.shape[0], xt.shape[1], k - 1)
        xp = torch.cat([left, xt], dim=2)
        if cache is not None:
            cache.index_copy_(0, idx, xp[:, :, xp.shape[2] - (k - 1):])
    else:
        xp = F.pad(xt, ((k - 1) // 2, k // 2))
    h = grouped_conv1d(xp, weight, bias, xt.shape[1])
    return F.layer_norm(h.transpose(1, 2), (h.shape[1],), ln_weight, ln_bias, eps)
