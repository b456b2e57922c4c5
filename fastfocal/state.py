"""Typed streaming state containers: one dataclass per stage, preallocated once, reset in place.

The shapes come from the modules that use the state (each model module's `init_state`);
this file only holds the containers. Every tensor has the slot axis first, so a batched step
gathers its rows by a slot-index tensor and writes them back with `index_copy_`;
`reset(slots)` clears rows without reallocating (captured CUDA graphs keep their pointers).
"""
from __future__ import annotations

import dataclasses
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


def _zeros(spec, slots: int, device, dtype):
    """A tensor for each shape in a (nested list of) shape tuple(s), slot axis prepended."""
    if isinstance(spec, tuple):
        return torch.zeros(slots, *spec, device=device, dtype=dtype)
    return [_zeros(s, slots, device, dtype) for s in spec]


class StageState:
    """Base of the per-stage containers: `pos` (S,) counts frames done; the rest are rings."""

    pos: Tensor

    @classmethod
    def zeros(cls, slots: int, device, dtype, **shapes):
        """Allocate: `shapes` gives each field's per-slot shape, or a nested list of them."""
        return cls(pos=torch.zeros(slots, dtype=torch.long, device=device),
                   **{k: _zeros(v, slots, device, dtype) for k, v in shapes.items()})

    def tensors(self) -> list[Tensor]:
        return [t for f in dataclasses.fields(self) for t in _flat(getattr(self, f.name))]

    def reset(self, slots: Tensor | list[int] | None = None) -> None:
        """Zero the given slots (all when None) in place; positions go back to 0."""
        for t in self.tensors():
            if slots is None:
                t.zero_()
            else:
                idx = torch.as_tensor(slots, dtype=torch.long, device=t.device)
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
