"""CUDA-graph runner for a fixed-shape batched step `fn(*inputs, idx) -> tuple[Tensor, ...]`.

Static input and slot-index buffers are sized for the largest batch bucket; each bucket
(1, 2, 4, ..., max) captures `fn` on the leading rows of those buffers. A call with n rows
copies its inputs in, points padding rows at a scratch slot and replays the smallest bucket
that holds n. Without CUDA (or with graphs off) the same `fn` runs eagerly on the same
buffers, unpadded unless asked, so the CPU path is the GPU path minus the replay.
"""
from __future__ import annotations

import bisect
import logging
import math
import statistics
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import tactics
from .kernels import _common
from .profiling import nvtx_range

log = logging.getLogger("fastfocal")
TIME_REPLAYS = 7  # timed replays per tactic (median), after 2 untimed


def graphs_enabled(device, requested: bool | None = True) -> bool:
    """Graphs on CUDA unless `requested` is False or FASTFOCAL_CUDA_GRAPHS=0."""
    if requested is False or not _common.env_flag("FASTFOCAL_CUDA_GRAPHS", True):
        return False
    return torch.device(device).type == "cuda"


def buckets_for(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself: 1, 2, 4, ..., max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def pick_bucket(buckets: Sequence[int], n: int) -> int:
    """Smallest bucket >= n (buckets sorted)."""
    i = bisect.bisect_left(buckets, n)
    if n < 1 or i == len(buckets):
        raise ValueError(f"batch {n} outside buckets {list(buckets)}")
    return buckets[i]


class GraphRunner:
    """Runs `fn` on static buffers: replays a captured graph per bucket, or calls it eagerly.

    specs: one (row_shape, dtype) per input. pad_slot: the slot index for padding rows and
    for warm-up and capture (which run the step for real on that slot's state). tune_for: the
    step's compute dtype, to choose each bucket's tactic by timing (None: the defaults);
    time_slots: timing replays step slots 0..b-1 for real (the caller resets them after).
    fixed: bucket -> tactic, captured as given without timing (reproduces an earlier build).
    Outputs are views into static buffers: valid until the next call.
    """

    def __init__(self, fn: Callable[..., tuple], specs, buckets: Sequence[int], device, pad_slot: int,
                 use_graphs: bool = False, pad_eager: bool = False, tune_for: torch.dtype | None = None,
                 time_slots: bool = False, fixed: dict | None = None):
        self.fn = fn
        self.buckets = sorted(set(buckets))
        self.device = torch.device(device)
        B = self.buckets[-1]
        self.inputs = [torch.zeros(B, *shape, dtype=dt, device=self.device) for shape, dt in specs]
        self.idx = torch.full((B,), pad_slot, dtype=torch.long, device=self.device)
        self.pad_slot = pad_slot
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.pad_eager = pad_eager
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.tune_for = tune_for if tactics.enabled() else None
        self.time_slots = time_slots
        self.tactics: dict[int, dict] = {}  # bucket -> the tactic its graph was captured with (tuned buckets)
        # bucket -> a tactic to capture with, untimed (an earlier build's `tactics`, e.g. read back from JSON)
        self.fixed = {int(b): dict(t) for b, t in (fixed or {}).items()}
        self.timings: dict[int, dict] = {}  # bucket -> {tactics.key(tactic): replay ms}

    @property
    def padded(self) -> bool:
        return bool(self.graphs) or self.pad_eager

    def rows_for(self, n: int) -> int:
        """Rows the step runs for n real rows: the bucket when padding, else n."""
        return pick_bucket(self.buckets, n) if self.padded else n

    def _call(self, b: int) -> tuple:
        return self.fn(*[x[:b] for x in self.inputs], self.idx[:b])

    def capture(self) -> bool:
        """Warm up and capture every bucket, largest first, into one memory pool. With
        `tune_for` set, each bucket is captured under every tactic worth timing
        (`tactics.space`) and the fastest graph is kept (`self.tactics`, `self.timings`). On a
        failure of the default form, warn and stay eager; a failing candidate is skipped.
        Returns whether graphs are in use."""
        if not self.use_graphs or self.graphs:
            return bool(self.graphs)
        try:
            pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(self.device)
            with torch.inference_mode():
                for b in reversed(self.buckets):  # largest first: smaller ones reuse its blocks
                    self._capture_bucket(b, pool, side)
            torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 -- any capture problem means: run eagerly
            warnings.warn(f"fastfocal: CUDA graph capture failed, running eagerly ({type(e).__name__}: {e})")
            self.graphs.clear()
            self.tactics.clear()
            self.timings.clear()
            self.use_graphs = False
        return bool(self.graphs)

    def _capture_bucket(self, b: int, pool, side) -> None:
        if b in self.fixed:
            with tactics.applied(self.fixed[b]):
                self.graphs[b] = self._capture_one(b, pool, side)
            self.tactics[b] = self.fixed[b]
            return
        switches = tactics.space(b, self.tune_for, self.device) if self.tune_for is not None else {}
        held: dict[tuple, tuple] = {}
        default = tactics.key({k: v[0] for k, v in switches.items()})

        def measure(t: dict) -> float:
            try:
                with tactics.applied(t):
                    held[tactics.key(t)] = self._capture_one(b, pool, side)
                return self._time(held[tactics.key(t)][0], b) if switches else 0.0
            except Exception as e:  # noqa: BLE001 -- a candidate that cannot run is not chosen
                if tactics.key(t) == default:
                    raise
                warnings.warn(f"fastfocal: tactic {t} failed at {b} rows, skipped ({type(e).__name__}: {e})")
                return math.inf

        best, times = tactics.choose(switches, measure)
        self.graphs[b] = held.pop(tactics.key(best))
        held.clear()  # the other candidates' graphs and outputs go back to the pool
        if switches:
            self.tactics[b], self.timings[b] = best, times
            log.info("bucket %d: tactic %s, %.3f ms (defaults %.3f ms); timed: %s", b, best, times[tactics.key(best)],
                     times[default], "; ".join(f"{dict(k)} {v:.3f}" for k, v in times.items()))

    def _capture_one(self, b: int, pool, side) -> tuple:
        """Warm-up and capture of bucket b on the pad slot: (graph, its static outputs)."""
        self.idx[:b].fill_(self.pad_slot)
        for x in self.inputs:
            x[:b].zero_()
        # twice eagerly, off the capture: Triton compiles/autotunes, allocator settles
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._call(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            outs = self._call(b)
        return g, tuple(outs)

    def _time(self, g, b: int) -> float:
        """Median ms of a replay of bucket b. With `time_slots` its rows step slots 0..b-1, so
        the state reads are as many as a real step's (the pad slot alone would sit in L2)."""
        if self.time_slots:
            self.idx[:b].copy_(torch.arange(b, device=self.device))
        try:
            return self._replay_ms(g)
        finally:
            self.idx[:b].fill_(self.pad_slot)

    def _replay_ms(self, g) -> float:
        for _ in range(2):
            g.replay()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(TIME_REPLAYS)]
        for a, e in ev:
            a.record()
            g.replay()
            e.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(a.elapsed_time(e) for a, e in ev)

    def run(self, n: int, inputs: Sequence[Tensor] | None = None, idx: Tensor | None = None) -> list[Tensor]:
        """Step n rows. `inputs`/`idx` (n rows, any device) are copied into the static
        buffers; pass None when the caller already wrote rows [0, n) of them."""
        b = self.rows_for(n)
        with torch.inference_mode():
            if inputs is not None:
                for buf, x in zip(self.inputs, inputs):
                    buf[:n].copy_(x, non_blocking=True)
            if idx is not None:
                self.idx[:n].copy_(idx, non_blocking=True)
            if b > n:
                for buf in self.inputs:
                    buf[n:b].zero_()
                self.idx[n:b].fill_(self.pad_slot)
            g = self.graphs.get(b)
            if g is None:
                outs = self._call(b)
            else:
                with nvtx_range(f"graph_replay[{b}]"):
                    g[0].replay()
                outs = g[1]
            return [o[:n] for o in outs]
