"""The single place that picks an implementation for each op.

Model modules call only these functions. Each fused op has a Triton kernel and a pure-PyTorch
reference `<op>_ref` beside it in `fastfocal.kernels.<op>`; the kernel runs on CUDA tensors, or
everywhere with FASTFOCAL_BACKEND=triton (on CPU that needs TRITON_INTERPRET=1 set before
fastfocal is imported: triton reads it when the kernels are defined); FASTFOCAL_BACKEND=torch
forces the reference. The reference path is the exact float32 path that matches the upstream
golden vectors.

Ops that end in a matmul epilogue (`linear_*`): with few rows (a small-batch streaming step)
the Triton path runs matmul, epilogue and a preceding norm in one kernel (`kernels/linear.py`);
with more rows the matmul stays on cuBLAS, without bias, and one pass applies bias, scale,
residual, activation or norm; the reference path lets the BLAS add the bias and applies the
rest with the kernel's `_ref`.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu
from .kernels import _common, attention, bsq, convnext, epilogue, focal_context as focal, linear as lin, modulate as mod, norm, status
from .kernels._common import derived, exact_convs, float32_weight, grouped_conv1d, pow2  # noqa: F401  (the model reaches them through ops)
from .state import all_rows


def _parse_backend(v: str | None) -> str:
    b = (v or "auto").lower()
    if b not in ("auto", "torch", "triton"):
        raise ValueError(f"FASTFOCAL_BACKEND must be auto, torch or triton, got {b!r}")
    return b


def backend() -> str:
    """'triton' or 'torch' as forced by FASTFOCAL_BACKEND, else 'auto' (asked on every op:
    memoised until the variable changes)."""
    return _common.env_cached("FASTFOCAL_BACKEND", _parse_backend)


def use_triton(x: Tensor) -> bool:
    b = backend()
    return b == "triton" or (b == "auto" and x.is_cuda)


# --------------------------------------------------------------------------- state rows
# idx=None means every slot of the state, in order (offline runs, one-stream sessions): the
# state tensors are used in place instead of gathered and scattered back.
def rows(state: Tensor, idx: Tensor | None) -> Tensor:
    """Rows idx of a slot-indexed state tensor (the tensor itself for idx None)."""
    return state if idx is None else state.index_select(0, idx)


def put_rows(state: Tensor, idx: Tensor | None, v: Tensor) -> None:
    """state[idx] = v in place (all rows for idx None)."""
    if idx is None:
        state.copy_(v)
    else:
        state.index_copy_(0, idx, v.to(state.dtype))


_DEFER = threading.local()  # .advances: the step's collected advances (`deferred_advances`), per thread


@contextlib.contextmanager
def deferred_advances(active: bool):
    """Within: `advance` collects the stages' frame-count updates instead of doing them, for
    the step's status launch to do after every read (`row_status(..., advances)`): no launch
    of their own. Yields the list (None when not active, and `advance` works as ever)."""
    prev = getattr(_DEFER, "advances", None)
    _DEFER.advances = [] if active else None
    try:
        yield _DEFER.advances
    finally:
        _DEFER.advances = prev


def advance(pos: Tensor, idx: Tensor | None, start: Tensor, n: int) -> None:
    """pos[idx] = start + n, start = rows(pos, idx): a stage's frame counts after a step (all
    rows for idx None: one in-place add instead of an add and a copy; within
    `deferred_advances`, left to the step's status launch)."""
    pending = getattr(_DEFER, "advances", None)
    if pending is not None:
        pending.append((pos, idx, start, n))
        return
    if idx is None:
        pos.add_(n)
    else:
        put_rows(pos, idx, start + n)


def _host_checks_ok(t: Tensor) -> bool:
    """A data-dependent shortcut may read t's values: on CPU, outside tracing (no device sync,
    nothing an exporter or a CUDA graph would bake in)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.compiler.is_exporting() \
        and not torch.jit.is_tracing()


def _cpu_path(x: Tensor) -> bool:
    """The CPU forms in `fastfocal.cpu` (same results as the references, less state traffic)."""
    return backend() == "auto" and _host_checks_ok(x)


def any_rows(mask: Tensor | None) -> bool:
    """Whether any row of a (B,) mask is set; True whenever reading it would cost a sync, so
    callers only skip work they know is a no-op (fresh-row patches when no row is fresh)."""
    return mask is not None and (not _host_checks_ok(mask) or bool(mask.any()))


# --------------------------------------------------------------------------- elementwise / norms
def gelu(x: Tensor) -> Tensor:
    if use_triton(x):
        return epilogue.epilogue(x.contiguous(), act="gelu")
    return epilogue.epilogue_ref(x, act="gelu")  # exact erf form


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, tail: tuple | None = None) -> Tensor:
    """tail: a causal conv's deferred cache write (`causal_conv_time_major(..., defer=True)`),
    done by the norm kernel's programs (no launch of its own) or after the norm."""
    return _norm(x, weight, bias, eps, False, tail)


def layer_norm_gelu(x: Tensor, weight: Tensor, bias: Tensor, eps: float, tail: tuple | None = None) -> Tensor:
    return _norm(x, weight, bias, eps, True, tail)


def _norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, act_gelu: bool, tail: tuple | None) -> Tensor:
    if use_triton(x) and x.shape[-1] <= 8192:
        return norm.norm(x.contiguous(), weight, bias, eps, act_gelu=act_gelu, tail=tail)
    y = norm.norm_ref(x, weight, bias, eps, act_gelu=act_gelu)
    if tail is not None:
        norm.tail_copy_ref(tail)
    return y


class Normed:
    """NORM(x) handed to the next matmul undone: on the few-row GPU path the matmul normalises
    its input rows itself (a prologue in `kernels/linear.py`) and stores them on the side, so
    a pre-norm block's norm costs no launch. `value(t)` gives the tensor to any other consumer
    (the norm kernel, once, if no matmul has stored it yet)."""

    __slots__ = ("x", "spec", "y")

    def __init__(self, x: Tensor, spec: tuple):
        self.x, self.spec, self.y = x, spec, None  # ("layer_norm", w, b, eps), ("dyt", alpha), ("snake", alpha)

    @property
    def shape(self):
        return self.x.shape

    def value(self) -> Tensor:
        if self.y is None:
            s = self.spec
            self.y = layer_norm(self.x, s[1], s[2], s[3]) if s[0] == "layer_norm" else dyt(self.x, s[1]) \
                if s[0] == "dyt" else snake(self.x, s[1])
        return self.y


def value(t):
    """The tensor behind a `Normed` (anything else as it is)."""
    return t.value() if isinstance(t, Normed) else t


def pre_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
             alpha: Tensor | None = None):
    """LayerNorm (weight, bias, eps) or DynamicTanh (alpha) of x for a matmul consumer: a
    `Normed` where that matmul can fuse it (few rows on the Triton path), else the tensor."""
    return _deferred(x, ("dyt", alpha) if alpha is not None else ("layer_norm", weight, bias, eps))


def _deferred(x: Tensor, spec: tuple):
    n = Normed(x, spec)
    return n if _skinny_rows(x) else n.value()


def pre_snake(x: Tensor, alpha: Tensor):
    """snake(x, alpha) for a matmul consumer, as `pre_norm`."""
    return _deferred(x, ("snake", alpha.contiguous()))


def dyt(x: Tensor, alpha: Tensor) -> Tensor:
    """DynamicTanh without affine: tanh(alpha * x), alpha a 1-element tensor."""
    if use_triton(x):
        return norm.norm(x.contiguous(), alpha=alpha)
    return norm.norm_ref(x, alpha=alpha)


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """x (B, T, C), alpha (C,): x + sin^2(alpha x) / (alpha + 1e-9)."""
    if use_triton(x):
        return epilogue.epilogue(x.contiguous(), act="snake", alpha=alpha.contiguous())
    return epilogue.epilogue_ref(x, act="snake", alpha=alpha)


# --------------------------------------------------------------------------- matmul + epilogue
# CPU: oneDNN matmul on weights reordered once into its blocked layout. A streaming step has
# 4 rows per stream, where the plain BLAS call repacks the weight on every call and reads it at
# ~60% of the memory bandwidth; the reordered weight is read once at the bandwidth (fp32 and
# bf16). The reorder is cached per weight tensor (views: per base tensor and view geometry) and
# redone when the weight changes in place (its version counter moves). Costs a second copy of
# the weights in memory. FASTFOCAL_CPU_PACK=0 or FASTFOCAL_BACKEND=torch: plain F.linear.
# bf16/fp16 where oneDNN cannot pack them (its bf16 reorder needs AVX-512 BW/VL/DQ or
# AVX-NE-CONVERT): up to FP16_GEMM_ROWS rows on FBGEMM's fp16 weights, longer runs in fp32 on the
# weight packed as fp32; both round once. On an AVX2 machine plain bf16 F.linear measured 8x
# slower than the fp32 route at 512 rows and 1.4x at 4.
_PACKED = _common.TensorCache()


def _has_pack_ops() -> bool:
    try:  # private oneDNN ops: a torch build without them takes plain F.linear
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._reorder_linear_weight) and \
            bool(torch.ops.mkldnn._linear_pointwise) and bool(torch.ops.mkldnn._linear_pointwise.binary)
    except (AttributeError, RuntimeError):
        return False


_PACK_OPS = _has_pack_ops()


def _pack_dtype(x: Tensor, w: Tensor) -> torch.dtype | None:
    """The dtype the CPU matmul computes in on a packed weight: x's, or fp32 for a bf16/fp16 that
    this CPU cannot pack; None: plain F.linear."""
    if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and w.dtype == x.dtype and w.dim() == 2 and backend() == "auto"
            and _common.env_flag("FASTFOCAL_CPU_PACK", True, cached=True)
            and _PACK_OPS and not (torch.is_grad_enabled() and w.requires_grad)
            and not w.is_inference()  # no version counter: an in-place change could not be seen
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()):
        return None
    return cpu.compute_dtype(x.dtype)


def _cached_pack(w: Tensor, tag, make, extra: tuple = ()):
    """make(w detached) in a plain tensor, cached per weight (views: per base tensor and view
    geometry) and `tag`, redone when w (or what `extra` stamps) changes."""
    base = w._base if w._base is not None else w
    views = _PACKED.setdefault(base, {})
    key = (w.storage_offset(), tuple(w.shape), w.stride(), tag)
    stamp = (w._version, w.data_ptr()) + extra  # data_ptr: `param.data = other` keeps the object, not the storage
    hit = views.get(key)
    if hit is None or hit[0] != stamp:
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor: usable in and out of inference mode
            hit = (stamp, make(w.detach()))
        views[key] = hit
    return hit[1]


def _packed(w: Tensor, dtype: torch.dtype) -> Tensor:
    return _cached_pack(w, dtype, lambda t: torch.ops.mkldnn._reorder_linear_weight(t.to(dtype).contiguous(), 4))


# rows up to which the fp16-weight GEMM beats the fp32 packed weight (bandwidth-bound): on a
# 2-core AVX2 EPYC, bf16 64 x 1024 x 4096: 3.8 against 5.4 ms; from 128 rows on they tie, and at
# 32000 x 10 x 512 (the first feature-extractor conv) it took 80 against 45 ms
FP16_GEMM_ROWS = 64


def _fp16_packed(w: Tensor, bias: Tensor | None):
    """FBGEMM's packed fp16 weight (and fp32 bias) of a bf16/fp16 w, cached like `_packed` (the
    bias's identity and version in the stamp); None where w has values beyond fp16's range
    (bf16 is exact in fp16 from 2^-14 to 65504; smaller magnitudes lose < 2^-25 each)."""
    def make(t: Tensor):
        wf = t.float()
        if not bool((wf.abs() <= 65504.0).all()):  # also false for inf / NaN
            return None
        return torch.ops.quantized.linear_prepack_fp16(wf, None if bias is None else bias.detach().float())

    return _cached_pack(w, "fp16-gemm", make, () if bias is None else (bias._version, bias.data_ptr()))


def _packed_call(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, act: str = "none",
                 res: Tensor | None = None) -> Tensor:
    """x W^T + b [GELU | + res] on the packed weight, computed in `dtype`, returned in x's.
    A bf16/fp16 x computed in fp32 takes FBGEMM's fp16 weights where it can (half the bytes)."""
    x2 = x.reshape(-1, x.shape[-1])
    if dtype != x.dtype and x2.shape[0] <= FP16_GEMM_ROWS and cpu.fp16_weight_gemm():
        p = _fp16_packed(weight, bias)
        if p is not None:
            y = torch.ops.quantized.linear_dynamic_fp16(x2.float(), p)
            if act == "gelu":
                y = F.gelu(y)
            if res is not None:
                y = y.add_(res.reshape(y.shape))
            return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    if dtype != x.dtype:
        x2, bias = x2.to(dtype), (float32_weight(bias) if bias is not None else None)
    if res is None:
        y = torch.ops.mkldnn._linear_pointwise(x2, _packed(weight, dtype), bias, act, [], "none" if act == "gelu" else "")
    else:
        y = torch.ops.mkldnn._linear_pointwise.binary(x2, res.reshape(x2.shape[0], -1).to(dtype),
                                                      _packed(weight, dtype), bias, "add")
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


# GPU, few rows (a small-batch streaming step: 4 rows per stream): the matmul and its epilogue
# in one Triton kernel (`kernels/linear.py`) instead of cuBLAS + an epilogue launch. Read once;
# FASTFOCAL_SKINNY_ROWS=0 keeps cuBLAS for every size.
SKINNY_ROWS = _common.env_int("FASTFOCAL_SKINNY_ROWS", 16, lo=0)
# GPU, many rows (offline runs, big-batch steps): FASTFOCAL_LARGE_GEMM=1 takes the same kernel
# with GEMM tiles for the matmuls that have an epilogue (GELU, Snake, residual, modulation) and
# for the feature-extractor convs (windows read in place: no unfold, pad or gather copy), in
# place of cuBLAS + an epilogue pass. Off by default until a GPU has timed it against cuBLAS
# (bench/kernels/bench_linear.py, bench/gpu_quick.sh).
LARGE_GEMM = _common.env_flag("FASTFOCAL_LARGE_GEMM", False)


def _gemm_tiles(x) -> bool:
    """Many-row matmuls take the matmul kernel's GEMM tiles: LARGE_GEMM, or float32 with split
    tensor-core dots (`_common.set_f32_dot`; cuBLAS would run them as exact SGEMMs)."""
    return LARGE_GEMM or _common.split_f32(x.dtype)


def _skinny_rows(x: Tensor) -> bool:
    K = x.shape[-1]
    return K > 0 and x.numel() <= SKINNY_ROWS * K and use_triton(x)


def _skinny(x: Tensor, weight: Tensor) -> bool:
    x = x.x if isinstance(x, Normed) else x
    return _skinny_rows(x) and x.dtype == weight.dtype and weight.dim() == 2 \
        and weight.stride(1) == 1  # a transposed weight stays on cuBLAS (no copy a step)


def _fused(x: Tensor, weight: Tensor) -> bool:
    """The matmul kernel with its epilogue: few rows, or (`_gemm_tiles`) any number of rows."""
    return _skinny(x, weight) or (not isinstance(x, Normed) and _gemm_tiles(x) and use_triton(x) and x.shape[-1] > 0
                                  and x.dtype == weight.dtype and weight.dim() == 2 and weight.stride(1) == 1)


def _skinny_linear(x, weight: Tensor, bias: Tensor | None, **epi) -> Tensor:
    """The few-row kernel; a `Normed` input is normalised inside it (and stored, once)."""
    if not isinstance(x, Normed):
        return lin.linear(x, weight, bias, **epi)
    if x.y is not None:
        return lin.linear(x.y, weight, bias, **epi)
    y = torch.empty(x.x.shape, dtype=x.x.dtype, device=x.x.device)  # contiguous: x.x may be a transposed view
    out = lin.linear(x.x, weight, bias, norm=x.spec, norm_out=y, **epi)
    x.y = y
    return out


def matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b (F.linear), on CPU through the reordered weight. x may be a `Normed`."""
    if _skinny(x, weight) or (_common.split_f32(weight.dtype) and _fused(x, weight)):
        return _skinny_linear(x, weight, bias)
    x = value(x)
    dtype = _pack_dtype(x, weight)
    return F.linear(x, weight, bias) if dtype is None else _packed_call(x, weight, bias, dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return matmul(x, weight, bias)


def _fused_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, act: str = "none",
               res: Tensor | None = None) -> Tensor | None:
    """GELU or a residual add (one, not both) as a post-op of the CPU matmul: one call instead
    of two; fp32 gives the same bits as the separate ops, bf16 rounds once instead of twice.
    None where it does not apply (then the caller runs matmul + epilogue)."""
    dtype = _pack_dtype(x, weight)
    if dtype is None or (act == "gelu") == (res is not None) or act not in ("gelu", "none"):
        return None
    if res is not None and (res.dtype != x.dtype or res.shape != (*x.shape[:-1], weight.shape[0])):
        return None
    return _packed_call(x, weight, bias, dtype, act, res)


def _epi(x: Tensor, weight: Tensor, bias: Tensor | None, act: str = "none", res: Tensor | None = None,
         **rest) -> Tensor:
    if _fused(x, weight):
        return _skinny_linear(x, weight, bias, act=act, res=res, **rest)
    x = value(x)
    if use_triton(x):
        h = F.linear(x, weight)
        return epilogue.epilogue(h, bias, out=h, act=act, res=res, **rest)
    y = None if any(v is not None for v in rest.values()) else _fused_cpu(x, weight, bias, act, res)
    return y if y is not None else epilogue.epilogue_ref(matmul(x, weight, bias), act=act, res=res, **rest)


def linear_1x1_transposed(x, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 transposed conv (weight (C_in, C_out, 1)) over time-major x: x W[:, :, 0] + b. The
    few-row kernel takes the taps transposed once (a transposed view has no unit K stride)."""
    if _skinny(x, weight[:, :, 0]):
        return _skinny_linear(x, derived(weight, "t1x1", lambda w: w[:, :, 0].t().contiguous()), bias)
    return matmul(x, weight[:, :, 0].t(), bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """GELU(x W^T + b): FFN / refiner / ConvNeXt hidden layer."""
    return _epi(x, weight, bias, act="gelu")


def linear_snake(x: Tensor, weight: Tensor, bias: Tensor | None, alpha: Tensor) -> Tensor:
    return _epi(x, weight, bias, act="snake", alpha=alpha.contiguous())


def linear_residual(x: Tensor, weight: Tensor, bias: Tensor | None, res: Tensor, gamma: Tensor | None = None) -> Tensor:
    """res + (x W^T + b) [* gamma]."""
    return _epi(x, weight, bias, res=res, gamma=gamma)


def linear_clamp(x: Tensor, weight: Tensor, bias: Tensor | None, lo: float, hi: float) -> Tensor:
    return _epi(x, weight, bias, act="clamp", lo=lo, hi=hi)


def linear_residual_layer_norm(x, weight, bias, res, ln_weight, ln_bias, eps) -> tuple[Tensor, Tensor]:
    """x' = res + (x W^T + b); returns (x', LayerNorm(x')), the latter a `Normed` on the
    few-row path (the next matmul normalises)."""
    if _skinny(x, weight):
        xr = lin.linear(x, weight, bias, res=res)
        return xr, Normed(xr, ("layer_norm", ln_weight, ln_bias, eps))
    if use_triton(x) and weight.shape[0] <= 8192:
        h = matmul(x, weight)  # cuBLAS, or the kernel for split float32 dots
        return norm.norm(h, ln_weight, ln_bias, eps, res=res, h_bias=bias, x_out=h)
    xr = _fused_cpu(x, weight, bias, res=res)
    if xr is not None:
        return xr, norm.norm_ref(xr, ln_weight, ln_bias, eps)
    return norm.norm_ref(matmul(x, weight, bias), ln_weight, ln_bias, eps, res=res)


def linear_residual_dyt(x, weight, bias, res, alpha) -> tuple[Tensor, Tensor]:
    """x' = res + (x W^T + b); returns (x', tanh(alpha x')), the latter a `Normed` on the
    few-row path."""
    if _skinny(x, weight):
        xr = lin.linear(x, weight, bias, res=res)
        return xr, Normed(xr, ("dyt", alpha))
    if use_triton(x):
        h = matmul(x, weight)  # cuBLAS, or the kernel for split float32 dots
        return norm.norm(h, alpha=alpha, res=res, h_bias=bias, x_out=h)
    xr = _fused_cpu(x, weight, bias, res=res)
    if xr is not None:
        return xr, norm.norm_ref(xr, alpha=alpha)
    return norm.norm_ref(matmul(x, weight, bias), alpha=alpha, res=res)


# Feature-extractor convs (no bias) over a time-major signal: a GEMM over the conv windows. On
# the Triton path with few windows (a streaming step's up to 256) the kernel reads the
# overlapping windows in place, the taps reordered once to (k, C_in); otherwise unfold copies
# them for the BLAS.
FE_WINDOW_ROWS = 256


def _windows_in_place(x: Tensor, weight: Tensor, windows: int) -> bool:
    return 0 < windows and (_gemm_tiles(x) or (windows <= FE_WINDOW_ROWS and SKINNY_ROWS > 0)) and use_triton(x) \
        and x.dtype == weight.dtype and x.is_contiguous()


def _taps_kc(weight: Tensor) -> Tensor:
    """(C_out, C_in, k) conv weight as (C_out, k * C_in): taps in the windows' memory order."""
    N, C, k = weight.shape
    return derived(weight, "taps_kc", lambda w: w.permute(0, 2, 1).reshape(N, k * C).contiguous())


def _causal_windows(x: Tensor, weight: Tensor, stride: int, cache: Tensor | None, start: Tensor | None,
                    replicate: bool = True) -> int:
    """Windows of a causal conv that the kernel reads in place over [cache ‖ x], or 0 where it
    cannot (no cache, fewer than k - 1 frames, not the Triton path, ...)."""
    k, B, T = weight.shape[-1], x.shape[0], x.shape[1]
    windows = B * ((T - 1) // stride + 1)
    ok = k > 1 and cache is not None and T >= k - 1 and _windows_in_place(x, weight, windows) \
        and cache.dtype == x.dtype and cache.is_contiguous() and (replicate or start is None)
    return windows if ok else 0


# From this many conv windows (LARGE_GEMM: GEMM tiles) the first feature-extractor layer's
# LayerNorm + GELU is its conv kernel's epilogue, whole 512-channel rows in one column tile: the
# largest activation of the model (3,200 frames/s x 512) is written once instead of written, read
# and rewritten by a norm pass. Only for small weights (FE_NORM_EPILOGUE_WEIGHT elements): a
# whole-row tile holds 32 rows, so every tile re-reads the whole weight from L2, nothing at 10 x
# 512 taps but ~4x a 128 x 128 tile's L2 traffic for the 1536 x 512 convs after it (L2-bound:
# slower than the norm pass it saves). Fewer windows keep the norm launch.
FE_NORM_EPILOGUE_ROWS = 1024
FE_NORM_EPILOGUE_WEIGHT = 65536


def causal_conv_ln_gelu(x: Tensor, weight: Tensor, stride: int, cache: Tensor | None, idx: Tensor | None,
                        start: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float) -> Tensor:
    """GELU(LayerNorm(causal_conv_time_major(x, ...))): a feature-extractor layer. Many windows
    on the GEMM-tile path and a small weight (the first layer): one launch with the norm in its
    epilogue, then the cache write (the kernel read the old cache rows); otherwise the conv,
    then the norm carrying that write."""
    k, T = weight.shape[-1], x.shape[1]
    if _gemm_tiles(x) and _causal_windows(x, weight, stride, cache, start) >= FE_NORM_EPILOGUE_ROWS \
            and weight.shape[0] <= lin.MAX_POST_NORM and weight.numel() <= FE_NORM_EPILOGUE_WEIGHT:
        y = lin.causal_conv(x, _taps_kc(weight), k, stride, cache, idx, start,
                            post_norm=(ln_weight.contiguous(), ln_bias.contiguous(), eps, True))
        put_rows(cache, idx, x[:, T - (k - 1):])  # after the kernel has read the old frames
        return y
    y, tail = causal_conv_time_major(x, weight, stride, cache, idx, start, defer=True)
    return layer_norm_gelu(y, ln_weight, ln_bias, eps, tail)


def conv_time_major(x: Tensor, weight: Tensor, stride: int, bias: Tensor | None = None) -> Tensor:
    """Valid conv1d over time of x (B, T, C_in) by weight (C_out, C_in, k) -> (B, T', C_out)."""
    N, C, k = weight.shape
    B, T = x.shape[0], x.shape[1]
    Tout = (T - k) // stride + 1
    if _windows_in_place(x, weight, B * Tout):
        return lin.linear(x.as_strided((B, Tout, k * C), (T * C, stride * C, 1), x.storage_offset()), _taps_kc(weight),
                          bias)
    return linear(x.unfold(1, k, stride).reshape(B, -1, C * k), weight.reshape(N, -1), bias)


def causal_conv_time_major(x: Tensor, weight: Tensor, stride: int, cache: Tensor | None = None,
                           idx: Tensor | None = None, start: Tensor | None = None, bias: Tensor | None = None,
                           replicate: bool = True, defer: bool = False):
    """conv_time_major of x left-padded by k - 1 frames: offline (cache None) x's first frame
    repeated (zeros if not `replicate`); streaming, the cache rows idx (S, k - 1, C_in) (rows
    whose frame count `start` is 0 are fresh: the first frame), which then hold the last
    k - 1 input frames. With few
    windows on the Triton path the kernel reads [cache ‖ x] in place (no pad, no fresh-row
    patch, no gather) when x has at least k - 1 frames; otherwise it reads the padded input's
    windows in place.

    defer: returns (y, tail): the cache write the in-place kernel leaves (it must follow the
    kernel's reads) as (x, cache, idx) for the norm after the conv to do (`layer_norm(...,
    tail=)`, no launch of its own), or None when it is done."""
    k = weight.shape[-1]
    if k == 1:
        y = conv_time_major(x, weight, stride, bias)
        return (y, None) if defer else y
    T = x.shape[1]
    if _causal_windows(x, weight, stride, cache, start, replicate):
        y = lin.causal_conv(x, _taps_kc(weight), k, stride, cache, idx, start, bias)
        if defer:
            return y, (x, cache, idx)
        put_rows(cache, idx, x[:, T - (k - 1):])  # after the kernel has read the old frames
        return y
    fresh = start == 0 if start is not None else None
    xp = causal_pad(x, k - 1, rows(cache, idx) if cache is not None else None, fresh, replicate, dim=1)
    if cache is not None:
        put_rows(cache, idx, xp[:, xp.shape[1] - (k - 1):])
    y = conv_time_major(xp, weight, stride, bias)
    return (y, None) if defer else y


def _grouped_in_place(x: Tensor, weight: Tensor, groups: int, windows: int) -> bool:
    """The matmul kernel reads x's grouped windows in place: the Triton path with few windows
    (or LARGE_GEMM), channels per group powers of two."""
    O, I, k = weight.shape
    Og = O // groups
    return _windows_in_place(x, weight, windows) and I & (I - 1) == 0 \
        and Og & (Og - 1) == 0 and Og >= 16 and O % groups == 0


def grouped_conv_gelu_time_major(xp: Tensor, weight: Tensor, bias: Tensor, groups: int) -> Tensor:
    """GELU(grouped conv1d(xp) + bias) of a padded time-major xp (B, L, C) -> (B, L - k + 1, O):
    on the Triton path the kernel reads the windows in place with bias and GELU fused, else
    `grouped_conv_time_major` then GELU."""
    if _grouped_in_place(xp, weight, groups, xp.shape[0] * (xp.shape[1] - weight.shape[-1] + 1)):
        return lin.grouped_windows(xp, _taps_kc(weight), weight.shape[-1], groups, bias, "gelu")
    return gelu(grouped_conv_time_major(xp, weight, bias, groups))


def ring_len_time_major(P: int, frames: int) -> int:
    """Slots of a time-major conv ring that a step of `frames` frames can read (P frames
    back) and write (its own) in one launch: P + frames rounded up to a power of two."""
    return pow2(P + frames)


def pos_conv_ring(x: Tensor, weight: Tensor, bias: Tensor, groups: int, ring: Tensor,
                  idx: Tensor | None, start: Tensor) -> Tensor:
    """x + GELU(grouped causal conv1d + bias) of x's frames (B, T, C) -> (B, T, C), left-padded by
    the k - 1 frames before them from a time-major ring (S, R, C) (stream frame f in slot
    f mod R, rows idx, None: row b; start (B,) each row's frames before x; frames before a
    stream's first are its first), then x's frames go into the ring. WavLM's positional conv
    streaming: no shift of the other R - T frames. On the Triton path the kernel reads the
    windows over [ring ‖ x] in place (no gather, pad or fresh-row patch) and, in a step, writes
    the new frames itself, the residual add in its epilogue; elsewhere the padded input is
    built and `grouped_conv_gelu_time_major` runs on it."""
    B, T, _ = x.shape
    k = weight.shape[-1]
    if _grouped_in_place(x, weight, groups, B * T) and ring.dtype == x.dtype and ring.is_contiguous():
        x = x.contiguous()
        return lin.grouped_ring_conv(x, _taps_kc(weight), k, groups, ring, idx, start, bias, "gelu_then_res", x)
    return x + grouped_conv_gelu_time_major(_ring_padded(x, ring, idx, start, k - 1, True), weight, bias, groups)


def causal_conv_ring(x: Tensor, weight: Tensor, ring: Tensor, idx: Tensor | None, start: Tensor,
                     bias: Tensor | None = None, replicate: bool = True) -> Tensor:
    """Causal conv1d (stride 1, + bias) of x's frames (B, T, C_in) -> (B, T, C_out), left-padded
    by the k - 1 frames before them from a time-major ring (as `pos_conv_ring`'s; before a
    stream's first frame: its first if `replicate`, else zeros), then x's frames go into the
    ring. On the Triton path with few windows the kernel reads [ring ‖ x] in place and, in a
    step, writes the frames itself: the decoder's embedding conv costs one launch."""
    k = weight.shape[-1]
    B, T, _ = x.shape
    if _windows_in_place(x, weight, B * T) and ring.dtype == x.dtype and ring.is_contiguous():
        return lin.causal_ring_conv(x.contiguous(), _taps_kc(weight), k, ring, idx, start, bias, replicate)
    return conv_time_major(_ring_padded(x, ring, idx, start, k - 1, replicate), weight, 1, bias)


def _ring_padded(x: Tensor, ring: Tensor, idx: Tensor | None, start: Tensor, P: int, replicate: bool) -> Tensor:
    """[the P frames before x ‖ x] (B, P + T, C) from a time-major ring; x's frames are then
    written into the ring (the result is a copy, so the conv may follow)."""
    rows_ = all_rows(idx, x.shape[0], x.device)
    left = lin.ring_frames_time_major(ring, rows_, start, P)  # frames before 0 read frame 0's slot
    if not replicate:  # ... which zero padding makes zeros
        before = (start[:, None] + torch.arange(-P, 0, device=start.device)) < 0
        if any_rows(before[:, 0]):
            left = left.masked_fill(before[:, :, None], 0)
    xp = causal_pad(x, P, left, start == 0, replicate, dim=1)  # a fresh row has nothing in the ring yet
    lin.ring_write_time_major(ring, rows_, start, x)
    return xp


def grouped_conv_time_major(xp: Tensor, w: Tensor, b: Tensor, groups: int) -> Tensor:
    """Grouped conv of an already padded, time-major xp (B, T+k-1, C) -> (B, T, O). For a few
    output frames (a streaming step) a batched GEMM over unfolded windows is ~8x faster than the
    library conv on CPU. So it is for long bf16 runs on CPU taken ~64 rows at a time (the
    unfolded windows stay in cache): there the library conv runs in fp32 (`grouped_conv1d`),
    3-4x slower (WavLM's pos conv over 500 frames: 61 -> 16 ms at batch 1, 214 -> 90 ms at batch 4),
    on a CPU with native bf16; without it, everything runs as fp32."""
    if xp.device.type == "cpu" and xp.dtype != torch.float32 and not cpu.native(xp.dtype):
        # no native bf16 matmul (AVX2): its baddbmm took 19% of an offline encode; fp32, one rounding
        return grouped_conv_time_major(xp.float(), float32_weight(w), float32_weight(b), groups).to(xp.dtype)
    B, L, C = xp.shape
    O, I, k = w.shape
    T = L - k + 1
    if T > 64:
        if xp.device.type != "cpu" or xp.dtype != torch.bfloat16:
            return grouped_conv1d(xp.transpose(1, 2), w, b, groups).transpose(1, 2)
        n = max(1, 64 // B)
        return torch.cat([grouped_conv_time_major(xp[:, a:min(T, a + n) + k - 1], w, b, groups) for a in range(0, T, n)], 1)
    G, Og = groups, O // groups
    # group g's window at (b, t) is xp[b, t:t+k, g*I:(g+1)*I]: taps-major, rows of I contiguous channels
    xp = xp.contiguous()
    u = xp.as_strided((G, B, T, k, I), (I, L * C, C, C, 1), xp.storage_offset()).reshape(G, B * T, k * I)
    wg = _taps_kc(w).view(G, Og, k * I)
    dtype = _pack_dtype(xp, wg[0])
    if dtype is not None:
        # each group's weight reordered once: the bmm repacked WavLM's 33 MB fp32 positional-conv
        # weight on every step (7 GB/s at 4 rows, 5x slower); the bias inside, rounded once
        return torch.stack([_packed_call(u[g], wg[g], b[g * Og:(g + 1) * Og], dtype) for g in range(G)], 1).view(B, T, O)
    if xp.dtype == torch.float32:
        y = torch.bmm(wg, u.transpose(1, 2))  # G, Og, B*T
        return y.view(G, Og, B, T).permute(2, 3, 0, 1).reshape(B, T, O) + b
    # reduced precision: the bias inside the GEMM, so the output is rounded once, as the conv's
    y = torch.baddbmm(b.view(G, Og, 1).expand(G, Og, B * T), wg, u.transpose(1, 2))
    return y.view(G, Og, B, T).permute(2, 3, 0, 1).reshape(B, T, O)


# --------------------------------------------------------------------------- causal padding
def causal_pad(
    x: Tensor,
    pad: int,
    cache: Tensor | None,
    fresh: Tensor | None,
    replicate: bool,
    dim: int = 2,
) -> Tensor:
    """Left-pad x along time (dim 2 of (B, C, T), or dim 1 of a time-major (B, T, C)) by `pad` frames.

    Offline (cache None): replicate the first frame, or zeros.
    Streaming: the cache (pad frames, laid out like x) holds the previous input frames; rows that
    are `fresh` (first chunk of a stream) use the first frame instead when `replicate`.
    """
    if pad == 0:
        return x
    first = x.narrow(dim, 0, 1).expand(*[pad if d == dim else -1 for d in range(x.dim())])
    if cache is None:
        left = first if replicate else torch.zeros_like(first)
    else:
        left = cache.to(x.dtype)
        if replicate and any_rows(fresh):
            left = torch.where(fresh[:, None, None], first, left)
    return torch.cat([left, x], dim=dim)


# --------------------------------------------------------------------------- focal modulation
# Longer runs (offline segments) do not take the fused kernel: on an H200 its offline forms
# measured 0.17x (causal, 8 x 2048 x 1024 bf16) and 0.31x (non-causal) of the reference,
# whose cuDNN convs are themselves slow at 512 taps. Causal long runs take
# `focal_context_long` (each level as a tensor-core GEMM per channel;
# FASTFOCAL_FOCAL_LONG=0: the reference, for A/B), non-causal ones the reference; streaming
# steps (4 frames) are the fused kernel's job. FASTFOCAL_BACKEND=triton takes the kernels for
# every length.
FOCAL_KERNEL_FRAMES = 64
FOCAL_LONG = _common.env_flag("FASTFOCAL_FOCAL_LONG", True)


def focal_context(
    ctx: Tensor,
    gates: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    causal: bool,
    caches: list[Tensor] | None = None,
    idx: Tensor | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """All focal levels of one modulation layer -> acc (B, T, C).

    ctx (B, T, C), gates (B, T, L+1). Causal: L+1 convs, the last the window conv; streaming
    passes the layer's full cache rings (S, C, ring_len(K)), rows idx updated in place, and
    start (B,), each row's frames before this step (0: a fresh stream). Non-causal: L convs and
    the global-mean level. The kernel covers L = 2 (every preset).
    """
    if caches is not None and _cpu_path(ctx):
        return cpu.focal_context_stream(ctx, gates, weights, biases, caches, idx, start)
    if caches is not None:
        idx = all_rows(idx, ctx.shape[0], ctx.device)
    if use_triton(ctx) and len(weights) == (3 if causal else 2):
        long_run, ws = ctx.shape[1] > FOCAL_KERNEL_FRAMES, [w.contiguous() for w in weights]
        if causal and long_run and (FOCAL_LONG or backend() == "triton"):
            return focal.focal_context_long(ctx, gates, ws, biases, caches, idx, start)
        if not long_run or backend() == "triton":
            return focal.focal_context(ctx, gates, ws, biases, causal, caches, idx, start)
    return focal.focal_context_ref(ctx, gates, weights, biases, causal, caches, idx, start)


def modulate(q: Tensor, acc: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """q * context_proj(acc), weight (C, C)."""
    if _fused(acc, weight):
        return lin.linear(acc, weight, bias, mul=q)
    if use_triton(q):
        m = F.linear(acc, weight)
        return mod.modulate(q, m, bias, out=m)
    return q * matmul(acc, weight, bias)  # = modulate_ref, through the CPU matmul


# --------------------------------------------------------------------------- attention
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
    memo: dict | None = None,
) -> Tensor:
    """WavLM attention core (B, T, C) from qkv = qkv_proj(y), y = LN(x): gated relative
    position bias, causal sliding window over chunks (window given) or full; streaming reads
    and updates the K/V rings (S, H, R, d) at rows idx (None: all, in order); start (B,) =
    position of frame 0. memo: one dict shared by the layers of a step (the CPU path builds
    the position bias once in it)."""
    y = value(y)
    if k_ring is not None and window is not None and _cpu_path(qkv):
        form = cpu.rel_attention_step if qkv.shape[1] <= cpu.MAX_STEP_FRAMES else cpu.rel_attention_long
        return form(qkv, y, gru_w, gru_b, gru_const, rel_emb, num_heads, start, chunk, window,
                    num_buckets, max_distance, k_ring, v_ring, idx, memo)
    if k_ring is not None:
        idx = all_rows(idx, qkv.shape[0], qkv.device)
    fn = attention.rel_attention if use_triton(qkv) else attention.rel_attention_ref
    return fn(qkv, y, gru_w, gru_b, gru_const, rel_emb, num_heads, start, chunk, window, num_buckets, max_distance,
              k_ring, v_ring, idx)


# --------------------------------------------------------------------------- step status
def row_status(audio: Tensor | None, checked: list[Tensor], max_amp: float, rows: int, advances=None) -> Tensor:
    """Per-row error codes of a step (`kernels/status.py`), and the stages' deferred frame-count
    advances: one launch on the Triton path."""
    if use_triton(audio if audio is not None else checked[0]):
        return status.row_status(audio, checked, max_amp, rows, advances)
    code = status.row_status_ref(audio, checked, max_amp, rows)
    status.apply_advances_ref(advances or [])
    return code


# --------------------------------------------------------------------------- quantizer
def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    if use_triton(x) and x.shape[-1] <= 62:
        return bsq.bsq(x, normalize=True, quantize=False, eps=eps)[0]
    return F.normalize(x, dim=-1, eps=eps)


def bsq_quantize(lats: Tensor) -> tuple[Tensor, Tensor]:
    """lats (..., D) -> tokens (...) int64 (first feature = MSB) and codes (..., D) = ±1/sqrt(D)."""
    if use_triton(lats) and lats.shape[-1] <= 62:
        _, toks, codes = bsq.bsq(lats, normalize=False)
        return toks, codes
    return bsq.bsq_quantize_ref(lats)


def bsq_encode(x: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised latents -> (normalised lats, tokens, codes) in one pass."""
    if use_triton(x) and x.shape[-1] <= 62:
        return bsq.bsq(x, eps=eps)
    return bsq.bsq_ref(x, eps)


def bsq_codes(toks: Tensor, D: int, dtype: torch.dtype) -> Tensor:
    """tokens (...) -> codes (..., D). A few tiny ops; `token_proj` skips codes altogether."""
    return bsq.bsq_codes_ref(toks, D, dtype)


def code_proj(codes: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Decompressor in_proj of codes (..., D): a skinny matmul (D <= 16) as one pass."""
    if use_triton(codes) and codes.shape[-1] <= 64:
        return bsq.code_proj(codes, weight.contiguous(), bias)
    return bsq.code_proj_ref(codes, weight, bias)


def token_proj(toks: Tensor, D: int, weight: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """in_proj(bsq_codes(toks)) without materialising codes: a signed sum of weight columns."""
    if use_triton(toks) and D <= 64:
        return bsq.code_proj(toks, weight.contiguous(), bias, D, dtype)
    return bsq.code_proj_ref(toks, weight, bias, D, dtype)


# --------------------------------------------------------------------------- ConvNeXt front
def dwconv_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                      causal: bool, cache: Tensor | None = None, idx: Tensor | None = None) -> Tensor:
    """LayerNorm(depthwise conv(x)) for x (B, T, C); causal zero left pad or cache rows idx of
    (S, C, K-1), updated in place; non-causal 'same' zero padding."""
    if cache is not None and causal and _cpu_path(x):
        return cpu.dwconv_layer_norm_stream(x, weight, bias, ln_weight, ln_bias, eps, cache, idx)
    if cache is not None:
        idx = all_rows(idx, x.shape[0], x.device)
    if use_triton(x) and x.shape[-1] <= 8192:
        return convnext.dwconv_layer_norm(x, weight, bias, ln_weight, ln_bias, eps, causal, cache, idx)
    return convnext.dwconv_layer_norm_ref(x, weight, bias, ln_weight, ln_bias, eps, causal, cache, idx)
