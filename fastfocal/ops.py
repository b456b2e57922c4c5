"""The single place that picks an implementation for each op.

Model modules call only these functions. Each fused op has a Triton kernel and a pure-PyTorch
reference in `fastfocal.kernels.<op>`; the kernel runs on CUDA tensors, or everywhere with
FASTFOCAL_BACKEND=triton (on CPU that needs TRITON_INTERPRET=1 set before triton is imported);
FASTFOCAL_BACKEND=torch forces the reference. The reference path is the exact float32 path
that matches the upstream golden vectors.

Ops that end in a matmul epilogue (`linear_*`) keep the matmul on cuBLAS: the Triton path runs
it without bias and applies bias, scale, residual, activation or norm in one pass.
Kernel modules are imported on first use, so TRITON_INTERPRET is read when they load.
"""
from __future__ import annotations

import importlib
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


def use_triton(x: Tensor) -> bool:
    b = backend()
    return b == "triton" or (b == "auto" and x.is_cuda)


def _k(name: str):
    return importlib.import_module(f"fastfocal.kernels.{name}")


# --------------------------------------------------------------------------- elementwise / norms
def gelu(x: Tensor) -> Tensor:
    if use_triton(x):
        return _k("epilogue").epilogue(x.contiguous(), act="gelu")
    return F.gelu(x)  # exact erf form


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    if use_triton(x) and x.shape[-1] <= 8192:
        return _k("norm").norm(x.contiguous(), weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm_gelu(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    if use_triton(x) and x.shape[-1] <= 8192:
        return _k("norm").norm(x.contiguous(), weight, bias, eps, act_gelu=True)
    return F.gelu(F.layer_norm(x, (x.shape[-1],), weight, bias, eps))


def dyt(x: Tensor, alpha: Tensor) -> Tensor:
    """DynamicTanh without affine: tanh(alpha * x), alpha a 1-element tensor."""
    if use_triton(x):
        return _k("norm").norm(x.contiguous(), alpha=alpha)
    return torch.tanh(alpha * x)


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """x (B, T, C), alpha (C,): x + sin^2(alpha x) / (alpha + 1e-9)."""
    if use_triton(x):
        return _k("epilogue").epilogue(x.contiguous(), act="snake", alpha=alpha.contiguous())
    return x + torch.sin(alpha * x).pow(2) / (alpha + 1e-9)


# --------------------------------------------------------------------------- matmul + epilogue
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def _epi(x: Tensor, weight: Tensor, bias: Tensor | None, **kw) -> Tensor:
    h = F.linear(x, weight)
    return _k("epilogue").epilogue(h, bias, out=h, **kw)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """GELU(x W^T + b): FFN / refiner / ConvNeXt hidden layer."""
    if use_triton(x):
        return _epi(x, weight, bias, act="gelu")
    return F.gelu(F.linear(x, weight, bias))


def linear_snake(x: Tensor, weight: Tensor, bias: Tensor | None, alpha: Tensor) -> Tensor:
    if use_triton(x):
        return _epi(x, weight, bias, act="snake", alpha=alpha.contiguous())
    return snake(F.linear(x, weight, bias), alpha)


def linear_residual(x: Tensor, weight: Tensor, bias: Tensor | None, res: Tensor, gamma: Tensor | None = None) -> Tensor:
    """res + (x W^T + b) [* gamma]."""
    if use_triton(x):
        return _epi(x, weight, bias, res=res, gamma=gamma)
    h = F.linear(x, weight, bias)
    return res + (h if gamma is None else h * gamma)


def linear_clamp(x: Tensor, weight: Tensor, bias: Tensor | None, lo: float, hi: float) -> Tensor:
    if use_triton(x):
        return _epi(x, weight, bias, act="clamp", lo=lo, hi=hi)
    return F.linear(x, weight, bias).clamp(lo, hi)


def linear_residual_layer_norm(x, weight, bias, res, ln_weight, ln_bias, eps) -> tuple[Tensor, Tensor]:
    """x' = res + (x W^T + b); returns (x', LayerNorm(x'))."""
    if use_triton(x) and weight.shape[0] <= 8192:
        h = F.linear(x, weight)
        return _k("norm").norm(h, ln_weight, ln_bias, eps, res=res, h_bias=bias, x_out=h)
    x = res + F.linear(x, weight, bias)
    return x, F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)


def linear_residual_dyt(x, weight, bias, res, alpha) -> tuple[Tensor, Tensor]:
    """x' = res + (x W^T + b); returns (x', tanh(alpha x'))."""
    if use_triton(x):
        h = F.linear(x, weight)
        return _k("norm").norm(h, alpha=alpha, res=res, h_bias=bias, x_out=h)
    x = res + F.linear(x, weight, bias)
    return x, torch.tanh(alpha * x)


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


# --------------------------------------------------------------------------- focal modulation
def focal_context(
    ctx: Tensor,
    gates: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    causal: bool,
    caches: list[Tensor] | None = None,
    idx: Tensor | None = None,
    fresh: Tensor | None = None,
) -> Tensor:
    """All focal levels of one modulation layer -> acc (B, T, C).

    ctx (B, T, C), gates (B, T, L+1). Causal: L+1 convs, the last the window conv; streaming
    passes the layer's full cache tensors (S, C, K-1), rows idx updated in place, fresh (B,).
    Non-causal: L convs and the global-mean level. The kernel covers L = 2 (every preset).
    """
    fc = _k("focal_context")
    if use_triton(ctx) and len(weights) == (3 if causal else 2):
        return fc.focal_context(ctx, gates, [w.contiguous() for w in weights], biases, causal, caches, idx, fresh)
    return fc.focal_context_ref(ctx, gates, weights, biases, causal, caches, idx, fresh)


def modulate(q: Tensor, acc: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """q * context_proj(acc), weight (C, C)."""
    if use_triton(q):
        m = F.linear(acc, weight)
        return _k("modulate").modulate(q, m, bias, out=m)
    return q * F.linear(acc, weight, bias)


# --------------------------------------------------------------------------- attention
def relative_bucket(rel: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    return _k("attention").relative_bucket_ref(rel, num_buckets, max_distance)


def attention_gate(y: Tensor, gru_w: Tensor, gru_b: Tensor, gru_const: Tensor, num_heads: int) -> Tensor:
    return _k("attention").attention_gate_ref(y, gru_w, gru_b, gru_const, num_heads)


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
) -> Tensor:
    """WavLM attention core (B, T, C) from qkv = qkv_proj(y), y = LN(x): gated relative
    position bias, causal sliding window over chunks (window given) or full; streaming reads
    and updates the K/V rings (S, H, R, d) at rows idx; start (B,) = position of frame 0."""
    a = _k("attention")
    fn = a.rel_attention if use_triton(qkv) else a.rel_attention_ref
    return fn(qkv, y, gru_w, gru_b, gru_const, rel_emb, num_heads, start, chunk, window, num_buckets, max_distance,
              k_ring, v_ring, idx)


# --------------------------------------------------------------------------- quantizer
def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    if use_triton(x) and x.shape[-1] <= 62:
        return _k("bsq").bsq(x, normalize=True, quantize=False, eps=eps)[0]
    return F.normalize(x, dim=-1, eps=eps)


def bsq_quantize(lats: Tensor) -> tuple[Tensor, Tensor]:
    """lats (..., D) -> tokens (...) int64 (first feature = MSB) and codes (..., D) = ±1/sqrt(D)."""
    q = _k("bsq")
    if use_triton(lats) and lats.shape[-1] <= 62:
        _, toks, codes = q.bsq(lats, normalize=False)
        return toks, codes
    return q.bsq_quantize_ref(lats)


def bsq_encode(x: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised latents -> (normalised lats, tokens, codes) in one pass."""
    q = _k("bsq")
    if use_triton(x) and x.shape[-1] <= 62:
        return q.bsq(x, eps=eps)
    return q.bsq_ref(x, eps)


def bsq_codes(toks: Tensor, D: int, dtype: torch.dtype) -> Tensor:
    """tokens (...) -> codes (..., D). A few tiny ops; `token_proj` skips codes altogether."""
    return _k("bsq").bsq_codes_ref(toks, D, dtype)


def code_proj(codes: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Decompressor in_proj of codes (..., D): a skinny matmul (D <= 16) as one pass."""
    q = _k("bsq")
    if use_triton(codes) and codes.shape[-1] <= 64:
        return q.code_proj(codes, weight.contiguous(), bias)
    return q.code_proj_ref(codes, weight, bias)


def token_proj(toks: Tensor, D: int, weight: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """in_proj(bsq_codes(toks)) without materialising codes: a signed sum of weight columns."""
    q = _k("bsq")
    if use_triton(toks) and D <= 64:
        return q.code_proj(toks, weight.contiguous(), bias, D, dtype)
    return q.code_proj_ref(toks, weight, bias, D, dtype)


# --------------------------------------------------------------------------- ConvNeXt front
def dwconv_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                      causal: bool, cache: Tensor | None = None, idx: Tensor | None = None) -> Tensor:
    """LayerNorm(depthwise conv(x)) for x (B, T, C); causal zero left pad or cache rows idx of
    (S, C, K-1), updated in place; non-causal 'same' zero padding."""
    cx = _k("convnext")
    if use_triton(x) and x.shape[-1] <= 8192:
        return cx.dwconv_layer_norm(x, weight, bias, ln_weight, ln_bias, eps, causal, cache, idx)
    return cx.dwconv_layer_norm_ref(x, weight, bias, ln_weight, ln_bias, eps, causal, cache, idx)
