"""Input checking on plain arguments: every front end (Codec, sessions, engine, corpus, server,
CLI) validates what arrives here, before any state is touched or any batch is allocated.

Nothing here needs a model: checks take the sizes they compare against as arguments.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor


class InputError(ValueError):
    """Bad user input: wrong shape, dtype, rate, empty, NaN/Inf, out of range, too large."""


# Float PCM is nominally [-1, 1]. Clipped or lightly over-driven audio (peaks a little above
# full scale) is normal and accepted; anything beyond +18 dBFS is not audio in that convention
# (wrong scaling, integer PCM cast to float, corrupt data) and would silently give garbage.
MAX_AMPLITUDE = 8.0

# Input sample rates taken (Hz), by files and Codec.encode alike: below 1 kHz is no speech (and a
# 1 Hz header would grow a file 16,000-fold at 16 kHz); 384 kHz is the highest common audio rate.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384000

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) from user values: device defaults to CUDA when available, dtype to float32."""
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise InputError(f"bad device {device!r}: {e}") from None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InputError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if device.type == "cpu" and dtype == torch.float16:
        raise InputError("float16 is supported on GPU only; use bfloat16 or float32 on CPU")
    # the engine runs on CPU and CUDA only: "meta", "mps", "xpu" ... were accepted here and failed
    # deep inside torch at the first call (meta) or while loading the weights
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device must be cpu or cuda, got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {str(device)!r} requested but there {'is' if torch.cuda.device_count() == 1 else 'are'} "
                         f"only {torch.cuda.device_count()} CUDA device(s)")
    return device, dtype


def token_dtype(codebook_size: int) -> np.dtype:
    """The smallest numpy dtype token files use for a codebook."""
    return np.dtype(np.uint16 if codebook_size <= 65536 else np.int32)


def positive_int(v, what: str, limit: int | None = None) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v < 1:
        raise InputError(f"{what} must be a positive integer, got {v!r}")
    if limit is not None and v > limit:
        raise InputError(f"{what} {v} is larger than the limit {limit}")
    return int(v)


def check_view(x, what: str, device=None) -> None:
    """A broadcast view (stride 0: torch `expand`, `np.broadcast_to`) of a few bytes can stand for
    terabytes, and a dense copy of it (a contiguous array, a widened dtype, a finite mask, a dtype
    conversion) was made before any memory check saw its size: an allocator error from deep in
    torch/numpy, or a full machine. Called before each such copy: a view must fit dense first."""
    strides = x.stride() if isinstance(x, Tensor) else tuple(s // x.itemsize for s in x.strides)
    n = x.numel() if isinstance(x, Tensor) else x.size
    span = 1 + sum((d - 1) * abs(s) for d, s in zip(x.shape, strides)) if n else 0  # elements it touches
    if n > span:  # elements overlap: a copy makes new memory
        check_fits(n * 16, device or ("cpu" if isinstance(x, np.ndarray) else x.device),  # a copy, a widened copy, a mask
                   f"{what} of shape {tuple(x.shape)} (a broadcast view of {span} elements, copied dense by the checks)",
                   "pass a smaller input")


def as_tensor(x, what: str) -> Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise InputError(f"{what} must be a numeric array, got numpy dtype {x.dtype}")
        check_view(x, what)  # ascontiguousarray / astype below copy it
        if x.dtype.kind == "u" and x.dtype.itemsize > 1:  # torch lacks most ops on uint16/32/64
            x = _widen_unsigned(x, what)
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise InputError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.layout != torch.strided:  # sparse tensors failed deep inside torch ("Could not run 'aten::ne.Scalar' ...")
        raise InputError(f"{what} must be a dense tensor, got layout {x.layout} (use x.to_dense())")
    if x.dtype in (torch.uint16, torch.uint32, torch.uint64):
        check_view(x, what)
        x = torch.from_numpy(_widen_unsigned(x.cpu().numpy(), what)).to(x.device)
    return x


def _widen_unsigned(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype == np.uint64 and x.size and x.max() > np.iinfo(np.int64).max:
        raise InputError(f"{what}: value {int(x.max())} out of range")
    return x.astype(np.int64)


# --------------------------------------------------------------------------- audio
def check_audio(sig, *, frame: int = 1, name: str = "audio", finite: bool = True) -> tuple[Tensor, bool]:
    """(batch, samples) float tensor and whether the input was 1-D.

    frame: the shortest meaningful row (one 20 ms frame); shorter rows are refused (a 2-D
    input with a few samples per row is almost always a (samples, channels) array: say so). finite=False
    leaves NaN/Inf and range to the caller (the engine flags them per stream on the device).
    """
    sig = as_tensor(sig, name)
    if not sig.is_floating_point():
        raise InputError(f"{name} must be floating point in [-1, 1], got {sig.dtype} "
                         "(convert integer PCM with x / 32768)")
    squeeze = sig.dim() == 1
    if squeeze:
        sig = sig.unsqueeze(0)
    if sig.dim() != 2:
        raise InputError(f"{name} must be (samples,) or (batch, samples), got shape {tuple(sig.shape)}")
    if sig.shape[0] == 0 or sig.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {tuple(sig.shape)})")
    if sig.shape[1] < frame:
        hint = (": it looks like (samples, channels); mix down with x.mean(1) or pass x.T"
                if not squeeze and sig.shape[1] <= 8 and sig.shape[0] > sig.shape[1] else "")
        raise InputError(f"{name} rows of {sig.shape[1]} samples are shorter than one {frame}-sample frame "
                         f"(shape {tuple(sig.shape)}){hint}")
    if finite:
        check_view(sig, name)  # naming the bad rows copies it (isfinite / abs), and callers convert it
        check_amplitude(sig, name)
    return sig, squeeze


def amplitude_problem(sig) -> str | None:
    """The one rule for float PCM values, on a tensor or numpy array: what is wrong, or None."""
    # the extremes in one pass without a copy (NaN propagates to both, Inf to one): abs() and
    # isfinite() made a float and a bool copy of the whole input (an hour of audio: +288 MB)
    if isinstance(sig, np.ndarray):
        peak = max(-float(sig.min()), float(sig.max())) if sig.size else 0.0
    else:
        lo, hi = torch.aminmax(sig) if sig.numel() else (torch.zeros(()), torch.zeros(()))
        lo, hi = float(lo), float(hi)
        peak = float("nan") if lo != lo or hi != hi else max(-lo, hi)
    if not math.isfinite(peak):
        return "contains NaN or Inf"
    if peak > MAX_AMPLITUDE:
        return (f"has samples of magnitude {peak:.3g}: float PCM must be within ±{MAX_AMPLITUDE:g} "
                "(nominally [-1, 1]); rescale it (integer PCM: x / 32768)")
    return None


def check_amplitude(sig: Tensor, name: str = "audio") -> None:
    """NaN/Inf or samples beyond ±MAX_AMPLITUDE are an InputError naming the rows."""
    problem = amplitude_problem(sig)
    if problem is None:
        return
    bad = ~torch.isfinite(sig).all(-1) if "NaN" in problem else sig.abs().amax(-1) > MAX_AMPLITUDE
    rows = _rows(bad) if sig.dim() > 1 else ""
    head, _, tail = problem.partition(":")
    raise InputError(f"{name} {head}{rows}{':' + tail if tail else ''}")


def _rows(mask: Tensor) -> str:
    if mask.numel() <= 1:
        return ""
    r = mask.nonzero().flatten().tolist()
    return f" (row{'s' if len(r) > 1 else ''} {r[:8]}{'...' if len(r) > 8 else ''})"


# --------------------------------------------------------------------------- tokens / frames
def check_tokens(toks, codebook_size: int, name: str = "tokens") -> tuple[Tensor, bool]:
    """(batch, T) int64 tensor of codebook indices, any integer input dtype."""
    toks = as_tensor(toks, name)
    if toks.is_floating_point() or toks.is_complex() or toks.dtype == torch.bool:
        raise InputError(f"{name} must be an integer tensor, got {toks.dtype}")
    squeeze = toks.dim() == 1
    if squeeze:
        toks = toks.unsqueeze(0)
    if toks.dim() != 2:
        raise InputError(f"{name} must be (T,) or (batch, T), got shape {tuple(toks.shape)}")
    if toks.numel() == 0:
        raise InputError(f"{name} are empty (shape {tuple(toks.shape)})")
    check_view(toks, name)  # .long() and aminmax copy it
    toks = toks.long()
    lo, hi = torch.aminmax(toks)
    _check_range(int(lo), int(hi), codebook_size, "")
    return toks, squeeze


def _check_range(lo: int, hi: int, codebook_size: int, prefix: str) -> None:
    if lo < 0 or hi >= codebook_size:
        raise InputError(f"{prefix}token out of range [0, {codebook_size}): found values in [{lo}, {hi}]")


def stream_piece(data, name: str, codebook_size: int | None = None) -> np.ndarray:
    """One message of one stream as a checked 1-D numpy array: float32 audio, or int64 tokens
    (codebook_size given). numpy checks: this runs per message, so cheap matters. Audio values
    are not scanned: the engine flags NaN/Inf and out-of-range samples per stream on the device."""
    data = _as_numpy(data, name)
    if data.ndim == 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 1:
        raise InputError(f"{name} for one stream must be (n,) or (1, n), got shape {data.shape}")
    return _piece_values(data, name, codebook_size)


def stream_batch(data, rows: int, what: str, codebook_size: int | None = None) -> np.ndarray:
    """Messages of `rows` streams as one checked (rows, n) numpy array (see stream_piece)."""
    name = f"{what} for {rows} stream{'s' if rows != 1 else ''}"
    data = _as_numpy(data, name)
    if data.ndim != 2 or data.shape[0] != rows:
        raise InputError(f"{name} must be ({rows}, n), one row per stream, got shape {data.shape}")
    return _piece_values(data, name, codebook_size)


def _as_numpy(data, name: str) -> np.ndarray:
    if isinstance(data, Tensor):
        t = data.detach()
        if t.device.type != "cpu" or t.dtype in (torch.bfloat16, torch.float16):
            check_view(t, name, "cpu")  # .cpu() / .float() copy it dense, on the host
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        elif t.dtype in (torch.uint16, torch.uint32, torch.uint64) or t.is_complex():
            t = as_tensor(t, name)  # widened (or refused) the slow way
        return t.numpy()
    if not isinstance(data, np.ndarray):
        as_tensor(data, name)  # raises the usual message
    return data


def _piece_values(data: np.ndarray, name: str, codebook_size: int | None) -> np.ndarray:
    check_view(data, name)  # a broadcast view is copied dense by astype and the engine's backlog
    kind = data.dtype.kind
    if codebook_size is not None:
        if kind not in "iu":
            raise InputError(f"{name} must be an integer tensor, got {data.dtype}")
        if data.size:
            _check_range(int(data.min()), int(data.max()), codebook_size, f"{name}: ")
        return data.astype(np.int64, copy=False)
    if kind != "f":
        raise InputError(f"{name} must be floating point in [-1, 1], got {data.dtype} "
                         "(convert integer PCM with x / 32768)")
    return data.astype(np.float32, copy=False)


def check_frames(x, dim: int, name: str) -> tuple[Tensor, bool]:
    """(batch, T, dim) float tensor of features, latents or codes."""
    x = as_tensor(x, name)
    if not x.is_floating_point():
        raise InputError(f"{name} must be floating point, got {x.dtype}")
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[-1] != dim:
        raise InputError(f"{name} must be (T, {dim}) or (batch, T, {dim}), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{name} are empty (shape {tuple(x.shape)})")
    check_view(x, name)  # isfinite copies it
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contain NaN or Inf")
    return x, squeeze


def one_stream(x: Tensor, name: str) -> Tensor:
    """A single stream's data: (n,) or (1, n) -> (n,)."""
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise InputError(f"{name} for one stream must be (n,) or (1, n), got shape {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------- memory
def available_bytes(device) -> int:
    """Memory a new allocation can take on `device` (free GPU memory; available host RAM, and no
    more than this process's address-space limit leaves)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "meta":
        return 1 << 62
    return min(_host_available(), _address_space_left())


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _address_space_left() -> int:
    """`ulimit -v` minus what the process has mapped: past it an allocation fails whatever RAM is free."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return 1 << 62
        with open("/proc/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return max(0, limit - mapped)
    except (ImportError, OSError, ValueError, StopIteration):
        return 1 << 62


def check_fits(nbytes: int, device, what: str,
               hint: str = "use a smaller batch, fewer streams or a shorter window") -> None:
    """Refuse an allocation that cannot fit, before making it."""
    avail = available_bytes(device)
    if nbytes > avail:
        raise InputError(f"{what} needs {_gib(nbytes)} but only {_gib(avail)} is available on "
                         f"{torch.device(device)}: {hint}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**27 else f"{n / 2**20:.3g} MiB"
