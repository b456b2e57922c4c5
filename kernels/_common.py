"""Helpers shared by the kernels: launch rules, input checks, and accurate math.

On CUDA the transcendental functions come from libdevice (accurate for large arguments,
unlike the `.approx` instructions); the interpreter has no libdevice, so under
TRITON_INTERPRET=1 the kernels take `tl.*` (numpy) versions through the INTERP constexpr.
"""
from __future__ import annotations

import contextlib
import os
import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

try:  # grid dependency control (programmatic dependent launch, Hopper+); absent in old Tritons
    import dataclasses

    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    if "launch_pdl" not in {f.name for f in dataclasses.fields(CUDAOptions)}:
        gdc_launch_dependents = gdc_wait = None
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# read once: triton.jit decides interpretation at decoration time, so must we
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SQRT1_2 = 0.7071067811865476

# The interpreter pays per program and per op, not per element: there, tiles are 16x larger
# and channel blocks whole. Same kernels, same code paths, fewer programs.
TILE = 4096 * (16 if INTERPRET else 1)
# The launchers' tile choices: the interpreter's (above) or the device's. Tests turn it off to run
# the device's tiles under the interpreter; the kernels' INTERP constexprs keep INTERPRET.
INTERP_TILES = INTERPRET


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

# Switches read on every call (the backend, the CPU weight packing) cost ~1-2 us each through
# os.environ (key encoding, value decoding): ~400 reads, ~1 ms of a CPU step. CPython keeps the
# encoded values in os.environ._data and stores a new object on every set, so a memo keyed on the
# stored object's identity sees each change (monkeypatch.setenv, os.environ[k] = v, del) for the
# cost of a dict lookup. os.environ itself is looked up on every call: a replaced mapping
# (mock.patch.object(os, "environ", {...})) is read directly, never memoised.
_ENVIRON_TYPE = type(os.environ)
_MEMO: dict = {}


def env_cached(name: str, parse):
    """parse(os.environ.get(name)), redone only when the variable was set, changed or unset."""
    env = os.environ
    raw_map = getattr(env, "_data", None) if type(env) is _ENVIRON_TYPE and os.name == "posix" else None
    if not isinstance(raw_map, dict):
        return parse(env.get(name))
    hit = _MEMO.get(name)
    if hit is not None and hit[0] is raw_map and raw_map.get(hit[1]) is hit[2]:
        return hit[3]
    k = name.encode()
    raw = raw_map.get(k)
    value = parse(env.get(name))  # raises for a bad value, and then nothing is memoised
    _MEMO[name] = (raw_map, k, raw, value)
    return value


def env_flag(name: str, default: bool, cached: bool = False) -> bool:
    """A FASTFOCAL_* on/off switch: 1/true/yes/on or 0/false/no/off (any case; unset or empty:
    default); anything else is a ValueError naming the variable, not a silent guess. cached: read
    through `env_cached` (a switch asked on every op)."""
    parse = lambda raw: _parse_flag(name, raw, default)  # noqa: E731
    return env_cached(name, parse) if cached else parse(os.environ.get(name))


def _parse_flag(name: str, raw: str | None, default: bool) -> bool:
    v = (raw or "").strip().lower()
    if not v:
        return default
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise ValueError(f"{name} must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, got {raw!r}")


def env_int(name: str, default: int, lo: int = 1) -> int:
    """A FASTFOCAL_* integer >= lo (unset or empty: default); a ValueError naming the variable."""
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        n = int(v)
    except ValueError:
        n = None
    if n is None or n < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {os.environ[name]!r}")
    return n


# Programmatic dependent launch (FASTFOCAL_PDL=1; off until the GPU A/B says otherwise): a
# kernel's CTAs may start while the previous kernel finishes; each kernel waits for it
# (`pdl_wait`) before touching any activation or state, and the matmul prefetches its weight
# slab into L2 before waiting. What a batch-1 step's chain of ~120 small launches loses is the
# gap between them and each weight's first DRAM round trip.
_PDL = {"env": env_flag("FASTFOCAL_PDL", False), "force": None}
_PDL_DEVICES: dict = {}


def set_pdl(on: bool | None) -> None:
    """Turn programmatic dependent launch on or off for later launches (None: FASTFOCAL_PDL's
    say). Where the device or Triton cannot, it stays off."""
    _PDL["force"] = on


def pdl_override() -> bool | None:
    """set_pdl's last say (None: FASTFOCAL_PDL decides)."""
    return _PDL["force"]


def pdl_requested() -> bool:
    """Whether PDL is asked for (set_pdl's say, else FASTFOCAL_PDL's)."""
    return _PDL["env"] if _PDL["force"] is None else _PDL["force"]


def pdl_available(device) -> bool:
    """Whether launches on `device` can use PDL: compiled (not the interpreter), a Triton with
    grid dependency control and a device of compute capability 9.0 or newer."""
    device = torch.device(device)
    if INTERPRET or gdc_wait is None or device.type != "cuda":
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _PDL_DEVICES:
        _PDL_DEVICES[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _PDL_DEVICES[i]


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL: asked for and available there."""
    return pdl_requested() and pdl_available(t.device)


def launch_opts(t: torch.Tensor) -> dict:
    """A launch's PDL constexpr and launch option for tensors on t's device (both or neither:
    a kernel launched with PDL must wait for its predecessor itself)."""
    return {"PDL": True, "launch_pdl": True} if pdl(t) else {"PDL": False}


# float32 dots (FASTFOCAL_F32_DOT, or set_f32_dot): "ieee" (CUDA-core FMAs: the exact path, the
# default) or one of Triton's split tensor-core products, each operand a sum of 16-bit (TF32) parts:
# "bf16x3" (~16 significant bits an operand, 3 bf16 MMAs), "tf32x3" (~22 bits, 3 TF32 MMAs),
# "bf16x6" (~24 bits, 6 bf16 MMAs). Activations, norms and residuals stay float32 whatever the mode.
F32_DOTS = ("ieee", "bf16x3", "tf32x3", "bf16x6")
_F32_DOT = {"force": None}


def _f32_mode(mode, source: str) -> str:
    if not isinstance(mode, str) or mode.strip().lower() not in F32_DOTS:
        raise ValueError(f"float32 dot mode {mode!r}{source}: expected one of {', '.join(F32_DOTS)}")
    return mode.strip().lower()


def set_f32_dot(mode: str | None) -> None:
    """The product float32 launches use from now on (None: FASTFOCAL_F32_DOT's say again, read
    at each launch like FASTFOCAL_BACKEND). A captured CUDA graph keeps the mode it was captured with."""
    _F32_DOT["force"] = None if mode is None else _f32_mode(mode, "")


def f32_dot() -> str:
    """The float32 dot mode: set_f32_dot's, else FASTFOCAL_F32_DOT's (default ieee); a bad
    environment value raises here, at the first float32 launch, naming the variable."""
    if _F32_DOT["force"] is not None:
        return _F32_DOT["force"]
    env = os.environ.get("FASTFOCAL_F32_DOT")
    return "ieee" if not env else _f32_mode(env, " (FASTFOCAL_F32_DOT)")


def split_f32(dtype: torch.dtype) -> bool:
    """Whether float32 matmuls of this dtype run as split tensor-core products (then they take
    the matmul kernel, not cuBLAS's exact SGEMM)."""
    return dtype == torch.float32 and f32_dot() != "ieee"


def device_dot_precision(dtype: torch.dtype, exact: bool = False) -> str:
    """A compiled launch's tl.dot input_precision: float32 takes the mode (exact: ieee whatever
    it is); 16-bit inputs ignore it."""
    return ("ieee" if exact else f32_dot()) if dtype == torch.float32 else "tf32"


def dot_precision(dtype: torch.dtype, exact: bool = False) -> str:
    """A launch's tl.dot input_precision. The interpreter knows only tf32/tf32x3/ieee and
    computes every dot in float32: ieee there."""
    return "ieee" if INTERPRET else device_dot_precision(dtype, exact)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Under PDL: wait until the previous kernel is done and its writes visible, then let the
    next kernel's CTAs launch (they wait here in turn, so the chain stays ordered). Every kernel
    calls it before its first load or store of anything a kernel writes."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, mask):
    """Ask L2 for the lines at ptrs where mask (no registers filled, nothing waited for)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def ring_slots(start: torch.Tensor, first: int, n: int, R: int) -> torch.Tensor:
    """(B, n) ring slots of stream frames start+first .. start+first+n-1 (frames before 0: frame 0's)."""
    f = start[:, None] + first + torch.arange(n, device=start.device)[None, :]
    return torch.remainder(f.clamp(min=0), R)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    for t in ts:
        check(t.device == dev, f"all tensors must be on {dev}, got one on {t.device}")
    check(dev.type == "cuda" or INTERPRET, "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before importing triton")


def out_or_new(out: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check(tuple(out.shape) == tuple(shape) and out.dtype == dtype and out.is_contiguous(),
          f"out must be contiguous {tuple(shape)} {dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


def evenly_strided_rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., C) with unit channel stride and evenly spaced rows (one row stride, as a
    (B, T, C) slice of a wider (B, T, F) tensor has), copying only when it has not."""
    if t.stride(-1) != 1 or t.dim() < 2 or not all(t.stride(i) == t.stride(i + 1) * t.shape[i + 1] for i in range(t.dim() - 2)):
        t = t.contiguous()
    return t


def rows(x: torch.Tensor) -> torch.Tensor:
    """View x (..., C) as (N, C) with unit channel stride, copying only when needed."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


@triton.jit
def gelu(x, INTERP: tl.constexpr):
    """Exact (erf) GELU of an fp32 tensor."""
    if INTERP:
        e = tl.erf(x * 0.7071067811865476)
    else:
        e = libdevice.erf(x * 0.7071067811865476)
    return 0.5 * x * (1.0 + e)


@triton.jit
def tanh(x, INTERP: tl.constexpr):
    if INTERP:
        # no libdevice here: exp identity (finite for any x), series near 0 where it cancels
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        t = (1.0 - e) / (1.0 + e)
        x2 = x * x
        small = x * (1.0 - x2 * (0.3333333333333333 - x2 * 0.13333333333333333))
        return tl.where(a < 0.1, small, tl.where(x < 0, -t, t))
    else:
        return libdevice.tanh(x)


@triton.jit
def sin(x, INTERP: tl.constexpr):
    if INTERP:
        return tl.sin(x)
    else:
        return libdevice.sin(x)


class TensorCache:
    """tensor -> dict, held while the tensor lives: what WeakIdKeyDictionary does, but a lookup is
    one dict get and a weakref call (~0.2 us) where its setdefault builds a weak reference object
    (~2 us; ~200 lookups a CPU step: one per Linear and derived weight)."""

    def __init__(self):
        self._d: dict[int, tuple] = {}

    def setdefault(self, t: torch.Tensor, default: dict) -> dict:
        k = id(t)
        hit = self._d.get(k)
        if hit is not None and hit[0]() is t:
            return hit[1]
        self._d[k] = (weakref.ref(t, lambda _r, k=k, d=self._d: d.pop(k, None)), default)
        return default

    def __getitem__(self, t: torch.Tensor) -> dict:
        hit = self._d.get(id(t))
        if hit is None or hit[0]() is not t:
            raise KeyError(t)
        return hit[1]

    def __len__(self) -> int:
        return len(self._d)


_DERIVED = TensorCache()  # weight -> {tag: (version stamp, derived tensor)}


def derived(w: torch.Tensor, tag, make):
    """make(w), computed once per weight and tag and redone if the weight changes (inference
    tensors have no version counter to watch, and traced ones (export, compile) no storage: computed
    every time)."""
    if w.is_inference() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return make(w)
    stamp = (w._version, w.data_ptr())
    cache = _DERIVED.setdefault(w, {})
    hit = cache.get(tag)
    if hit is None or hit[0] != stamp:
        with torch.inference_mode(False), torch.no_grad():
            hit = (stamp, make(w.detach()))
        cache[tag] = hit
    return hit[1]


def float32_weight(w: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a (reduced-precision) weight, made once and redone if it changes
    (a float32 weight is itself)."""
    return w if w.dtype == torch.float32 else derived(w, "float32", lambda t: t.float())


def grouped_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                   stride: int = 1) -> torch.Tensor:
    """F.conv1d (groups > 1 above all), safe in reduced precision on CPU and exact in fp32 on CUDA.

    oneDNN's grouped/depthwise bf16 convolution returns garbage on AMX CPUs (relative error ~1
    against fp32), so on CPU in bf16/fp16 the conv runs in fp32 (weights converted once) and
    the result is rounded back.
    """
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        b = float32_weight(bias) if bias is not None else None
        return torch.nn.functional.conv1d(x.float(), float32_weight(weight), b, stride, groups=groups).to(x.dtype)
    with exact_convs(x):
        return torch.nn.functional.conv1d(x, weight, bias, stride, groups=groups)


def exact_convs(x: torch.Tensor):
    """For a float32 CUDA input, cuDNN convs in true float32 for the duration (`ieee_cudnn_convs`);
    otherwise nothing."""
    return ieee_cudnn_convs() if x.is_cuda and x.dtype == torch.float32 else contextlib.nullcontext()


@contextlib.contextmanager
def ieee_cudnn_convs():
    """cuDNN convs in true float32 for the duration. PyTorch lets cuDNN run float32 convs in
    TF32 by default (10-bit mantissa: ~1e-3 relative error), and float32 is fastfocal's exact
    path. Sets the process-wide flag: the new per-op API where it exists (reading the legacy
    flag after setting the new one raises), else the legacy one."""
    c = torch.backends.cudnn
    if hasattr(getattr(c, "conv", None), "fp32_precision"):
        obj, attr, exact = c.conv, "fp32_precision", "ieee"
    else:
        obj, attr, exact = c, "allow_tf32", False
    old = getattr(obj, attr)
    setattr(obj, attr, exact)
    try:
        yield
    finally:
        setattr(obj, attr, old)
