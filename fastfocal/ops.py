"""The single place that picks an implementation for each fused op.

Model modules call only these functions. Today every op runs its pure-PyTorch reference;
Triton kernels from `fastfocal.kernels` plug in here (CUDA tensors, or FASTFOCAL_BACKEND=triton).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

SQRT1_2 = 1.0 / math.sqrt(2.0)


def backend() -> str:
    """'triton' or 'torch' as forced by FASTFOCAL_BACKEND, else 'auto'."""
    b = os.environ.get("FASTFOCAL_BACKEND", "auto").lower()
    if b not in ("auto", "torch", "triton"):
        raise ValueError(f"FASTFOCAL_BACKEND must be auto, torch or triton, got {b!r}")
    return b


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x)  # exact erf form


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def dyt(x: Tensor, alpha: Tensor) -> Tensor:
    """DynamicTanh without affine: tanh(alpha * x), alpha a 1-element tensor."""
    return torch.tanh(alpha * x)


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """x (B, T, C), alpha (C,): x + sin^2(alpha x) / (alpha + 1e-9)."""
    return x + torch.sin(alpha * x).pow(2) / (alpha + 1e-9)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


# --------------------------------------------------------------------------- causal padding
def causal_pad(
    x: Tensor,
    pad: int,
    cache: Tensor | None,
    fresh: Tensor | None,
    replicate: bool,
) -> Tensor:
    """Left-pad x (B, C, T) by `pad` frames along time.

    Offline (cache None): replicate the first frame, or zeros.
    Streaming: the cache (B, C, pad) holds the previous input frames; rows that are `fresh`
    (first chunk of a stream) use the first frame instead when `replicate`.
    """
    if pad == 0:
        return x
    if cache is None:
        left = x[:, :, :1].expand(-1, -1, pad) if replicate else x.new_zeros(x.shape[0], x.shape[1], pad)
    else:
        left = cache.to(x.dtype)
        if replicate and fresh is not None:
            left = torch.where(fresh[:, None, None], x[:, :, :1].expand(-1, -1, pad), left)
    return torch.cat([left, x], dim=2)


def conv1d_causal(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int = 1,
    groups: int = 1,
    cache: Tensor | None = None,
    fresh: Tensor | None = None,
    replicate: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Causal conv on x (B, C, T) with left pad kernel-1.

    Returns (y, new_cache) where new_cache is the last kernel-1 input frames (None offline).
    """
    k = weight.shape[-1]
    xp = causal_pad(x, k - 1, cache, fresh, replicate)
    y = F.conv1d(xp, weight, bias, stride=stride, groups=groups)
    new_cache = xp[:, :, xp.shape[2] - (k - 1):] if (cache is not None and k > 1) else None
    return y, new_cache


# --------------------------------------------------------------------------- focal context
def focal_context(
    ctx: Tensor,
    gates: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    causal: bool,
    caches: list[Tensor] | None = None,
    fresh: Tensor | None = None,
) -> tuple[Tensor, list[Tensor] | None]:
    """All focal levels of one modulation layer.

    ctx (B, T, C), gates (B, T, L+1). Causal: len(weights) == L+1 (the last one is the window
    conv). Non-causal: len(weights) == L and the last level is the global mean.
    Returns acc (B, T, C) and the updated caches (streaming).
    """
    c = ctx.transpose(1, 2)
    acc = None
    new_caches = [] if caches is not None else None
    n_levels = gates.shape[-1]
    for lvl, (w, b) in enumerate(zip(weights, biases)):
        if causal:
            cache = caches[lvl] if caches is not None else None
            c, nc = conv1d_causal(c, w, b, groups=c.shape[1], cache=cache, fresh=fresh)
            if new_caches is not None:
                new_caches.append(nc)
        else:
            k = w.shape[-1]
            c = F.conv1d(F.pad(c, ((k - 1) // 2, k // 2)), w, b, groups=c.shape[1])
        c = gelu(c)
        term = c * gates[:, :, lvl].unsqueeze(1)
        acc = term if acc is None else acc + term
    if not causal:
        glob = gelu(c.mean(dim=2, keepdim=True))
        acc = acc + glob * gates[:, :, n_levels - 1].unsqueeze(1)
    return acc.transpose(1, 2), new_caches


# --------------------------------------------------------------------------- attention
def relative_bucket(rel: Tensor, num_buckets: int, max_distance: int) -> Tensor:
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


def attention_gate(y: Tensor, gru_w: Tensor, gru_b: Tensor, gru_const: Tensor, num_heads: int) -> Tensor:
    """Per-head gate of the gated relative position bias. y (B, T, C) -> (B, H, T)."""
    B, T, C = y.shape
    yh = y.view(B, T, num_heads, C // num_heads).transpose(1, 2)  # B H T d
    g = F.linear(yh, gru_w, gru_b).view(B, num_heads, T, 2, -1).sum(-1)
    g = torch.sigmoid(g.float())
    a, b = g[..., 0], g[..., 1]
    return a * (b * gru_const.view(1, num_heads, 1).float() - 1.0) + 2.0


def gated_rel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    rel_emb: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    k_valid: Tensor | None,
    chunk: int,
    window: int | None,
    num_buckets: int,
    max_distance: int,
) -> Tensor:
    """Attention with a gated relative position bias, for one block of queries.

    q (B, H, Tq, d); k, v (B, H, Tk, d); gate (B, H, Tq) float32; rel_emb (num_buckets, H);
    q_pos (B, Tq) and k_pos (B, Tk) absolute frame positions; k_valid (B, Tk) bool or None.
    Causal (window not None): query p sees keys j with e - window <= j < e,
    e = chunk * (p // chunk + 1) (the caller bounds e by the sequence end through k_valid).
    """
    rel = k_pos[:, None, :] - q_pos[:, :, None]  # B Tq Tk
    bias = F.embedding(relative_bucket(rel, num_buckets, max_distance), rel_emb.float())  # B Tq Tk H
    bias = bias.permute(0, 3, 1, 2) * gate.unsqueeze(-1)  # B H Tq Tk
    allowed = torch.ones_like(rel, dtype=torch.bool)
    if window is not None:
        e = (q_pos // chunk + 1) * chunk
        allowed = (k_pos[:, None, :] < e[:, :, None]) & (k_pos[:, None, :] >= e[:, :, None] - window)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    bias = bias.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


# --------------------------------------------------------------------------- quantizer
def bsq_quantize(lats: Tensor) -> tuple[Tensor, Tensor]:
    """lats (..., D) -> tokens (...) int64 (first feature = MSB) and codes (..., D) = ±1/sqrt(D)."""
    D = lats.shape[-1]
    bits = lats > 0
    weights = 2 ** torch.arange(D - 1, -1, -1, device=lats.device, dtype=torch.int64)
    toks = (bits.long() * weights).sum(-1)
    codes = torch.where(bits, 1.0, -1.0).to(lats.dtype) / math.sqrt(D)
    return toks, codes


def bsq_codes(toks: Tensor, D: int, dtype: torch.dtype) -> Tensor:
    """tokens (...) -> codes (..., D)."""
    shifts = torch.arange(D - 1, -1, -1, device=toks.device, dtype=torch.int64)
    bits = (toks.long().unsqueeze(-1) >> shifts) & 1
    return (bits.to(dtype) * 2 - 1) / math.sqrt(D)
