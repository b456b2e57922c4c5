"""Typed streaming state containers: one dataclass per stage, preallocated once, reset in place.

The shapes come from the modules that use the state (each model module's `init_state`);
this file only holds the containers. Every tensor has the slot axis first, so a batched step
gathers its rows by a slot-index tensor and writes them back with `index_copy_`;
`reset(slots)` clears rows without reallocating (captured CUDA graphs keep their pointers).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor


_ARANGE: dict = {}


def all_rows(idx: Tensor | None, n: int, device) -> Tensor:
    """idx, or for None (every slot in order) the index of all n rows: cached, so no arange
    per call, and a static tensor a captured CUDA graph may keep."""
    if idx is not None:
        return idx
    key = (n, str(device))
    if key not in _ARANGE:
        with torch.inference_mode(False):
            _ARANGE[key] = torch.arange(n, device=device)
    return _ARANGE[key]


def _flat(v) -> list[Tensor]:
    # FocalState.caches nests lists (layer -> level): recurse, or reset/nbytes miss them
    if isinstance(v, Tensor):
        return [v]
    if isinstance(v, list):
        return [t for x in v for t in _flat(x)]
    return []


# A stage's rings are carved from one zeroed buffer: one allocation and one fill instead of one
# each (~60 launches for a fresh offline run's state). Each starts ALIGN elements apart, so every
# ring keeps the 16-byte alignment the kernels' vector loads (and Triton's specialisation) want.
ALIGN = 64


def _size(spec, slots: int) -> int:
    """Elements (each tensor rounded up to ALIGN) of a (nested list of) shape tuple(s)."""
    if isinstance(spec, tuple):
        return -(-slots * math.prod(spec) // ALIGN) * ALIGN
    return sum(_size(s, slots) for s in spec)


def _carve(spec, slots: int, flat: Tensor, off: int):
    """(a contiguous (slots, *shape) view of flat for each shape in spec, the offset after them)."""
    if isinstance(spec, tuple):
        n = slots * math.prod(spec)
        return flat[off:off + n].view(slots, *spec), off + _size(spec, slots)
    out = []
    for s in spec:
        t, off = _carve(s, slots, flat, off)
        out.append(t)
    return out, off


class StageState:
    """Base of the per-stage containers: `pos` (S,) counts frames done; the rest are rings."""

    pos: Tensor

    @classmethod
    def zeros(cls, slots: int, device, dtype, **shapes):
        """Allocate: `shapes` gives each field's per-slot shape, or a nested list of them."""
        flat = torch.zeros(sum(_size(v, slots) for v in shapes.values()), device=device, dtype=dtype)
        fields, off = {}, 0
        for k, v in shapes.items():
            fields[k], off = _carve(v, slots, flat, off)
        st = cls(pos=torch.zeros(slots, dtype=torch.long, device=device), **fields)
        st._flat = flat  # not a field: reset(None) zeroes it in one go
        return st

    def rows(self, lo: int, hi: int) -> "StageState":
        """The same container over slots lo..hi-1 as views: what a step does to it happens to
        those slots of this state (a run over a range of slots uses the rings in place)."""
        def cut(v):
            if isinstance(v, Tensor):
                return v[lo:hi]
            return [cut(x) for x in v] if isinstance(v, list) else v
        return type(self)(**{f.name: cut(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def tensors(self) -> list[Tensor]:
        return [t for f in dataclasses.fields(self) for t in _flat(getattr(self, f.name))]

    def reset(self, slots: Tensor | list[int] | None = None) -> None:
        """Zero the given slots (all when None) in place; positions go back to 0."""
        if slots is None:
            flat = getattr(self, "_flat", None)
            for t in [self.pos, flat] if flat is not None else self.tensors():
                t.zero_()
            return
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.pos.device)
        for t in self.tensors():
            t.index_fill_(0, idx, 0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def slots(self) -> int:
        return self.pos.shape[0]


@dataclass
class EncoderState(StageState):
    pos: Tensor  # (S,) frames already encoded
    fe_caches: list[Tensor]  # feature-extractor conv inputs, time-major (S, k-1, C_in)
    pos_conv_cache: Tensor  # (S, R, dim) time-major ring, R >= conv_pos - 1 + chunk (ops.ring_len_time_major)
    k_ring: list[Tensor]  # per layer (S, H, R, d), R = window - chunk
    v_ring: list[Tensor]


@dataclass
class FocalState(StageState):
    pos: Tensor  # (S,) frames already processed
    caches: list[list[Tensor]]  # per layer, per focal level (S, C, k-1)


@dataclass
class DecoderState(StageState):
    pos: Tensor  # (S,) frames already decoded
    emb_cache: Tensor  # (S, R, input_dim) time-major ring, R >= k - 1 + chunk (ops.ring_len_time_major)
    caches: list[Tensor]  # per ConvNeXt block (S, dim, k-1)
