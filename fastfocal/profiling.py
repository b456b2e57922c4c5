"""NVTX ranges for Nsight Systems: `with nvtx_range("encoder"): ...`.

On only when CUDA and the `nvtx` package are present (FASTFOCAL_NVTX=0 turns them off,
=1 forces them on); otherwise `nvtx_range` returns one shared no-op context, so a marked
region costs one function call.
"""
from __future__ import annotations

import contextlib

import torch

from .kernels._common import env_flag

try:
    import nvtx as _nvtx
except ImportError:  # optional at run time
    _nvtx = None

_NULL = contextlib.nullcontext()
_RANGES: dict[str, "_Range"] = {}


def _enabled() -> bool:
    flag = env_flag("FASTFOCAL_NVTX", None)  # unset: on where CUDA is
    if _nvtx is None or flag is False:
        return False
    return flag is True or torch.cuda.is_available()


ENABLED = _enabled()
_DOMAIN = _nvtx.get_domain("fastfocal") if ENABLED else None


class _Range:
    # pre-built attributes: a push/pop costs ~0.1 us
    __slots__ = ("attr",)

    def __init__(self, name: str):
        self.attr = _DOMAIN.get_event_attributes(name)

    def __enter__(self):
        _DOMAIN.push_range(self.attr)

    def __exit__(self, *exc):
        _DOMAIN.pop_range()
        return False


def nvtx_range(name: str):
    """A context manager marking `name` in the fastfocal NVTX domain (no-op when off)."""
    if not ENABLED:
        return _NULL
    r = _RANGES.get(name)
    if r is None:
        r = _RANGES[name] = _Range(name)
    return r
