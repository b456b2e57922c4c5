"""Tactics: equivalent forms of a streaming step that only the device can rank, chosen by timing.

A tactic is one setting of the few switches whose best value depends on the GPU and on the
rows stepped together:

- `pdl`: programmatic dependent launch (each kernel may start while the previous one ends);
- `large_gemm`: the matmul kernel with GEMM tiles instead of cuBLAS + an epilogue pass
  (`ops.LARGE_GEMM`);
- `focal_window_rows`: from how many rows the focal layers take their many-row form
  (`focal_context.WINDOW_ROWS`; `OFF`: never);
- `attn_keys`: the streaming attention's key block (`attention.STREAM_KEYS`).

`graphs.GraphRunner.capture` captures a bucket's step under each candidate and keeps the
fastest graph (`choose`): a few more captures per bucket at start-up instead of defaults that no
one timed on this device. A switch whose environment variable is set is pinned, not timed.
Switches that change rounding are timed for 16-bit steps only: float32 keeps one arithmetic
(the path whose tokens equal the reference's). FASTFOCAL_TUNE=0 keeps the defaults.
"""
from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Callable

import numpy as np
import torch

from . import ops
from .kernels import _common, attention, focal_context

OFF = 1 << 62  # focal_window_rows: no step has that many rows
MARGIN = 0.03  # a candidate replaces the best so far only if this much faster: noise never flips a choice
ENV = {"pdl": "FASTFOCAL_PDL", "large_gemm": "FASTFOCAL_LARGE_GEMM",
       "focal_window_rows": "FASTFOCAL_FOCAL_WINDOW_ROWS", "attn_keys": "FASTFOCAL_ATTN_TILE"}
_FOCAL_ROWS = focal_context.WINDOW_ROWS  # the many-row form's threshold as configured


def enabled() -> bool:
    return _common.env_flag("FASTFOCAL_TUNE", True)


def current() -> dict:
    """The switches as they stand."""
    return {"pdl": _common.pdl_requested(), "large_gemm": ops.LARGE_GEMM,
            "focal_window_rows": focal_context.WINDOW_ROWS, "attn_keys": attention.STREAM_KEYS}


def _set(t: dict) -> None:
    for name, v in t.items():
        if name == "pdl":
            _common.set_pdl(v)
        elif name == "large_gemm":
            ops.LARGE_GEMM = v
        elif name == "focal_window_rows":
            focal_context.WINDOW_ROWS = v
        elif name == "attn_keys":
            attention.STREAM_KEYS = v
        else:
            raise KeyError(f"no tactic switch {name!r} (switches: {', '.join(ENV)})")


@contextlib.contextmanager
def applied(t: dict):
    """Launches inside take tactic t (a dict of some switches); the switches are restored after.
    A captured graph keeps the forms it was captured with."""
    old, old_pdl = current(), _common.pdl_override()
    try:
        _set(t)
        yield
    finally:
        _set({k: v for k, v in old.items() if k in t and k != "pdl"})
        _common.set_pdl(old_pdl)


def space(rows: int, dtype: torch.dtype, device) -> dict[str, tuple]:
    """The switches worth timing for a step of `rows` streams in `dtype` on `device` -> their
    values, the current one first."""
    cur = current()
    out: dict[str, tuple] = {}

    def add(name: str, values: tuple) -> None:
        if ENV[name] not in os.environ:
            out[name] = (cur[name],) + tuple(v for v in values if v != cur[name])

    if torch.device(device).type != "cuda":
        return out
    if _common.pdl_available(device):
        add("pdl", (False, True))
    if dtype in (torch.float16, torch.bfloat16):
        if rows >= 2:  # from 2 streams the feature extractor's first convs leave the few-row kernel
            add("large_gemm", (False, True))
        if rows >= _FOCAL_ROWS:
            add("focal_window_rows", (_FOCAL_ROWS, OFF))
        add("attn_keys", (64, 32))
    return out


def parse_fixed(fixed: dict, buckets) -> dict[int, dict]:
    """An earlier build's tactics (bucket -> tactic; keys may be JSON strings) checked against
    `buckets`: ValueError naming the bad entry (also for a file read back as a list or a string,
    which failed with AttributeError; echoed values are cut short, a corrupt file can hold anything)."""
    if not isinstance(fixed, dict):
        raise ValueError(f"tactics must be a dict of bucket -> switches, got {type(fixed).__name__} {fixed!r:.60}")
    out = {}
    for b, t in fixed.items():
        try:  # an int or its JSON string: 1.9 or "1.9" is no bucket (int() would truncate it)
            bi = int(b) if isinstance(b, numbers.Integral) and not isinstance(b, bool) else int(str(b).strip())
        except (TypeError, ValueError):
            raise ValueError(f"tactics: bucket {b!r:.60} is not an integer") from None
        if bi not in buckets:
            raise ValueError(f"tactics: bucket {bi} is not one of this engine's {list(buckets)}")
        if not isinstance(t, dict):
            raise ValueError(f"tactics[{bi}] must be a dict of switches, got {type(t).__name__}")
        out[bi] = {}
        for name, v in t.items():
            if isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)):
                v = int(v)  # numpy integers too; 64.0 is no integer
            integer = type(v) is int
            ok = {"pdl": isinstance(v, bool), "large_gemm": isinstance(v, bool),
                  "focal_window_rows": integer and v >= 1,
                  "attn_keys": integer and v in (16, 32, 64, 128)}.get(name)
            if ok is None:
                raise ValueError(f"tactics[{bi}]: no switch {name!r:.60} (switches: {', '.join(ENV)})")
            if not ok:
                raise ValueError(f"tactics[{bi}][{name!r}] = {t[name]!r:.60} is not a valid value")
            out[bi][name] = v
    return out


def key(t: dict) -> tuple:
    return tuple(sorted(t.items()))


def choose(switches: dict[str, tuple], measure: Callable[[dict], float],
           margin: float = MARGIN) -> tuple[dict, dict]:
    """Coordinate descent from each switch's first value: every switch in turn tries its other
    values with the others at the best so far, and a value is taken only if it is `margin`
    faster. measure(tactic) -> time (inf: the tactic failed), called once per tactic.
    Returns (the best tactic, {key(tactic): time})."""
    best = {k: v[0] for k, v in switches.items()}
    times = {key(best): measure(dict(best))}
    t_best = times[key(best)]
    for name, values in switches.items():
        for v in values[1:]:
            t = {**best, name: v}
            if key(t) not in times:
                times[key(t)] = measure(dict(t))
            if times[key(t)] < t_best * (1 - margin):
                best, t_best = t, times[key(t)]
    return best, times
