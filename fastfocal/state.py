"""Typed streaming state: one dataclass per stage, preallocated once, reset in place.

Every tensor has the slot axis first, so a batched step gathers its rows by a slot-index
tensor and writes them back with `index_copy_`; `reset(slots)` clears rows without
reallocating (captured CUDA graphs keep their pointers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CodecConfig


def _flat(v) -> list[Tensor]:
    # FocalState.caches nests lists (layer -> level): recurse, or reset/nbytes miss them
    if isinstance(v, Tensor):
        return [v]
    if isinstance(v, list):
        return [t for x in v for t in _flat(x)]
    return []


def _tensors(obj) -> list[Tensor]:
    return [t for f in dataclasses.fields(obj) for t in _flat(getattr(obj, f.name))]


class _State:
    def reset(self, slots: Tensor | list[int] | None = None) -> None:
        """Zero the given slots (all when None) in place; positions go back to 0."""
        for t in _tensors(self):
            if slots is None:
                t.zero_()
            else:
                idx = torch.as_tensor(slots, dtype=torch.long, device=t.device)
                t.index_fill_(0, idx, 0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(self))

    @property
    def slots(self) -> int:
        return self.pos.shape[0]


@dataclass
class EncoderState(_State):
    pos: Tensor  # (S,) frames already encoded
    fe_caches: list[Tensor]  # feature-extractor conv inputs, time-major (S, k-1, C_in)
    pos_conv_cache: Tensor  # (S, dim, conv_pos-1)
    k_ring: list[Tensor]  # per layer (S, H, R, d), R = window - chunk
    v_ring: list[Tensor]

    @classmethod
    def allocate(cls, cfg: CodecConfig, slots: int, device, dtype) -> "EncoderState":
        e = cfg.encoder
        z = lambda *s, dt=dtype: torch.zeros(*s, device=device, dtype=dt)  # noqa: E731
        ins = (1,) + tuple(e.hidden_dims[:-1])
        R = e.window_size - cfg.chunk_frames
        d = e.dim // e.num_heads
        return cls(
            pos=z(slots, dt=torch.long),
            fe_caches=[z(slots, k - 1, c) for c, k in zip(ins, e.kernel_sizes)],
            pos_conv_cache=z(slots, e.dim, e.conv_pos - 1),
            k_ring=[z(slots, e.num_heads, R, d) for _ in range(e.num_layers)],
            v_ring=[z(slots, e.num_heads, R, d) for _ in range(e.num_layers)],
        )


def _focal_kernels(focal_window: int, focal_level: int, focal_factor: int) -> list[int]:
    return [focal_factor * l + focal_window for l in range(focal_level)]


@dataclass
class FocalState(_State):
    pos: Tensor  # (S,) frames already processed
    caches: list[list[Tensor]]  # per layer, per focal level (S, C, k-1)

    @classmethod
    def allocate(cls, part, slots: int, device, dtype, last_window: int | None = None) -> "FocalState":
        ks = _focal_kernels(part.focal_window, part.focal_level, part.focal_factor)
        caches = []
        n = len(part.hidden_dims)
        for i, c in enumerate(part.hidden_dims):
            w = last_window if (last_window is not None and i == n - 1) else part.window_size
            caches.append([torch.zeros(slots, c, k - 1, device=device, dtype=dtype) for k in ks + [w]])
        return cls(pos=torch.zeros(slots, dtype=torch.long, device=device), caches=caches)


@dataclass
class DecoderState(_State):
    pos: Tensor  # (S,) frames already decoded
    emb_cache: Tensor  # (S, input_dim, k-1)
    caches: list[Tensor]  # per ConvNeXt block (S, dim, k-1)

    @classmethod
    def allocate(cls, cfg: CodecConfig, slots: int, device, dtype) -> "DecoderState":
        d = cfg.decoder
        k = d.kernel_size
        return cls(
            pos=torch.zeros(slots, dtype=torch.long, device=device),
            emb_cache=torch.zeros(slots, d.input_dim, k - 1, device=device, dtype=dtype),
            caches=[torch.zeros(slots, d.dim, k - 1, device=device, dtype=dtype) for _ in range(d.num_layers)],
        )


def encoder_side(cfg: CodecConfig, slots: int, device, dtype) -> tuple[EncoderState, FocalState]:
    return (
        EncoderState.allocate(cfg, slots, device, dtype),
        FocalState.allocate(cfg.compressor, slots, device, dtype),
    )


def decoder_side(cfg: CodecConfig, slots: int, device, dtype) -> tuple[FocalState, DecoderState]:
    dc = cfg.decompressor
    return (
        FocalState.allocate(dc, slots, device, dtype, last_window=dc.last_window_size),
        DecoderState.allocate(cfg, slots, device, dtype),
    )
