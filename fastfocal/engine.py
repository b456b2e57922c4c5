"""Many-stream serving: a slot pool and one batched 80 ms chunk step for every ready stream.

    engine = fastfocal.StreamEngine(codec, max_streams=64)        # mode "full": audio -> tokens + audio
    sid = engine.open()
    engine.submit(sid, samples)           # any number of 16 kHz samples, buffered per stream
    for sid, out in engine.step().items():  # one chunk for every stream with 1280 samples ready
        out.tokens, out.audio, out.error
    tail = engine.finish(sid)             # zero-padded last chunk, like Stream.flush; frees the slot

State for `max_streams` slots (plus one scratch slot for padding rows) is allocated once;
opening a stream resets its slot in place. Streams have their own clocks: a step advances
exactly the streams that have a whole chunk buffered and leaves every other slot untouched.
On CUDA the step is a CUDA-graph replay per batch bucket (see graphs.py).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import gc
import itertools
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .config import CodecConfig
from .graphs import GraphRunner, buckets_for, graphs_enabled
from .inputs import DTYPES, InputError, check_fits, positive_int, stream_batch, stream_piece
from .model import FocalCodecModel
from .pipeline import ERRORS, MODE_OUTPUTS, MODES, Pipeline
from .profiling import nvtx_range
from .streaming import check_codec
from .tactics import parse_fixed

if TYPE_CHECKING:
    from .codec import Codec


def freeze_heap() -> int:
    """Take every object alive now out of the cyclic garbage collector's scans (gc.collect(),
    then gc.freeze()); returns how many were frozen.

    A full collection walks every tracked object: with a model loaded that is ~300k objects and
    107-163 ms on the 2-core CPU machine (`bench/engine_host.py`), which lands inside a step
    as a latency spike. After a freeze a full collection sees only newer objects (0.5-1.7 ms
    there). Objects frozen are still freed by reference counting; only reference cycles alive
    now and garbage later are kept. StreamEngine calls it once built; a single-stream app can
    call it after loading its codec."""
    gc.collect()
    gc.freeze()
    if not getattr(freeze_heap, "_exit_hook", False):
        atexit.register(gc.unfreeze)  # lets interpreter shutdown free them (nanobind warns of leaks otherwise)
        freeze_heap._exit_hook = True
    return gc.get_freeze_count()


# the shared input rings grow (every slot at once) to at most this many chunks; a longer backlog
# of one stream is kept apart for that stream alone. 16: what `fastfocal serve` lets wait by
# default (max_pending_chunks 8, + 1 and a partial chunk) stays on the vectorised ring path
MAX_RING_CHUNKS = 16


class EngineFull(RuntimeError):
    """open() with every slot taken."""


class StreamOutput:
    """What one stream produced: tokens (int64) and/or float32 audio at the output rate, on
    the engine's device. error is None, 'non-finite input', 'input out of range' or
    'non-finite output' (sticky: once set, the stream's outputs are garbage until it is closed)."""

    # step() makes thousands of these per call: a row's tensor view is made on first access
    # (a view costs ~0.6 us, 5-12 ms per step at 4,096 streams if made eagerly)
    __slots__ = ("_tokens", "_audio", "_row", "error")

    def __init__(self, tokens: Tensor | None = None, audio: Tensor | None = None, error: str | None = None):
        self._tokens, self._audio, self._row, self.error = tokens, audio, None, error

    @classmethod
    def _of_row(cls, tokens: Tensor | None, audio: Tensor | None, row: int, error: str | None) -> StreamOutput:
        o = cls.__new__(cls)
        o._tokens, o._audio, o._row, o.error = tokens, audio, row, error
        return o

    def _materialise(self) -> None:
        r = self._row
        if r is not None:
            self._row = None
            self._tokens = None if self._tokens is None else self._tokens[r]
            self._audio = None if self._audio is None else self._audio[r]

    @property
    def tokens(self) -> Tensor | None:
        self._materialise()
        return self._tokens

    @property
    def audio(self) -> Tensor | None:
        self._materialise()
        return self._audio

    def __repr__(self) -> str:
        return f"StreamOutput(tokens={self.tokens!r}, audio={self.audio!r}, error={self.error!r})"


@dataclasses.dataclass
class StepResult:
    """One step for many streams as batched tensors: row i belongs to stream ids[i].
    tokens (n, 4) int64 / audio (n, 1920) float32 (None when the mode has none), on the
    engine's device; errors (n,) sticky error codes (0: fine, else a key of pipeline.ERRORS)."""

    ids: np.ndarray
    tokens: Tensor | None
    audio: Tensor | None
    errors: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class StreamEngine:
    """A fixed pool of `max_streams` stream slots stepped together, one chunk per step.

    mode: "full" (audio in, tokens + audio out), "encode" (audio in, tokens out) or
    "decode" (tokens in, audio out). device/dtype default to the codec's and must match it
    (load the codec where the engine should run). cuda_graphs: capture the step per batch
    bucket on CUDA (FASTFOCAL_CUDA_GRAPHS=0 turns it off); capture happens here, at start-up.
    tune: with graphs, capture each bucket under the step's equivalent forms and keep the
    fastest on this device (`fastfocal.tactics`; `engine.tactics` says which; FASTFOCAL_TUNE=0
    or tune=False keeps the defaults). tactics: an earlier engine's `tactics` (bucket -> tactic;
    JSON's string keys do): those buckets are captured with them, untimed, so a rebuild computes
    exactly what that engine did (16-bit outputs depend on the forms chosen).
    freeze_gc: once built, `freeze_heap()` (the model, the state and the graphs leave the
    garbage collector's full scans, which otherwise stall a step for ~0.1 s now and then).

    Pending input lives on the host in one ring per slot (numpy, step-major; grown when a submit
    does not fit), so a step takes every ready chunk as one view or one vectorised copy, no per-stream
    tensor work; `step_batch` returns the outputs as batched tensors. A CUDA tensor passed to
    submit is copied back, which syncs. Not thread-safe: drive it from one loop.
    """

    def __init__(self, codec: "Codec", max_streams: int, mode: str = "full", device=None, dtype=None,
                 cuda_graphs: bool = True, freeze_gc: bool = True, tune: bool = True, tactics: dict | None = None):
        check_codec(codec)
        if mode not in MODES:
            raise InputError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        max_streams = positive_int(max_streams, "max_streams")
        if device is not None and not _same_device(torch.device(device), codec.device):
            raise InputError(f"device {device} differs from the codec's ({codec.device}): load the codec there")
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype, dtype)
        if dtype is not None and dtype != codec.dtype:
            raise InputError(f"dtype {dtype} differs from the codec's ({codec.dtype}): load the codec with it")
        self.codec, self.mode, self.max_streams = codec, mode, max_streams
        self.device, self.dtype = codec.device, codec.dtype
        cfg = codec.config
        self.chunk = codec.chunk_size if mode != "decode" else cfg.chunk_frames  # samples or tokens in
        self.hop = cfg.token_hop
        self.scratch = max_streams  # padding rows (and graph warm-up) run on this slot
        in_dtype = torch.long if mode == "decode" else self.dtype
        self._np_in = np.int64 if mode == "decode" else np.float32  # host rings (numpy has no bf16)
        per_slot = Pipeline.bytes_per_slot(codec.model, mode, self.dtype)
        ring_cap = 2 * self.chunk
        check_fits((max_streams + 1) * per_slot + 3 * max_streams * self.chunk * torch.finfo(self.dtype).bits // 8,
                   self.device, f"a {mode} engine of {max_streams} streams ({per_slot / 2**20:.3g} MiB of state each)")
        check_fits(max_streams * ring_cap * 8, "cpu", f"input rings for {max_streams} streams")
        self.pipeline = Pipeline(codec.model, mode, max_streams + 1)
        self.states = self.pipeline.states
        self._slot_ids = torch.arange(max_streams + 1, device=self.device)
        if tactics is not None:
            try:
                tactics = parse_fixed(tactics, buckets_for(max_streams))
            except ValueError as e:
                raise InputError(str(e)) from None
        self.runner = GraphRunner(self.pipeline.step, [((self.chunk,), in_dtype)], buckets_for(max_streams),
                                  self.device, self.scratch, use_graphs=graphs_enabled(self.device, cuda_graphs),
                                  tune_for=self.dtype if tune else None, time_slots=True, fixed=tactics)
        pin = self.device.type == "cuda"  # pinned staging: the copy in is asynchronous
        self._ring_dtype = torch.from_numpy(np.zeros(0, self._np_in)).dtype
        self._host_in = torch.zeros(max_streams, self.chunk, dtype=self._ring_dtype, pin_memory=pin)
        self._host_idx = torch.zeros(max_streams, dtype=torch.long, pin_memory=pin)
        # per slot: ring of pending input, read position, count, sticky error code, owner id.
        # The rings are laid out step-major, (cap / chunk, slots, chunk): chunk d of every slot
        # is one contiguous block, so when the streams stepped are slots a..b at one ring
        # position (every stream ready, in step) the step's input is a view, with no gather
        # (and on CUDA the rings are pinned: that view is copied to the device directly).
        self._pin = pin
        self._ring = self._new_ring(ring_cap // self.chunk)
        self._head = np.zeros(max_streams, np.int64)
        self._fill = np.zeros(max_streams, np.int64)
        self._err = np.zeros(max_streams, np.int32)
        self._sid = np.full(max_streams, -1, np.int64)  # -1: free
        # input beyond a slot's ring (the shared rings grow to MAX_RING_CHUNKS chunks, for every
        # slot at once): slot -> [deque of arrays, oldest first; their total length]
        self._over: dict[int, list] = {}
        self._slot: dict[int, int] = {}  # open stream id -> slot
        self._free = list(range(max_streams - 1, -1, -1))  # pop(): lowest first, then the last freed
        self._next_id = 0
        self._lookup = None  # (open ids sorted, their slots): submit_batch's vectorised lookup
        self._codebook = codec.codebook_size if mode == "decode" else None  # stream_piece's token check
        if self.runner.capture() and self.runner.timings:
            self.pipeline.reset()  # timing stepped the (free) slots for real: one fill a stage
        if freeze_gc:
            freeze_heap()

    # ------------------------------------------------------------------ memory
    @staticmethod
    def bytes_per_stream(codec: "Codec | CodecConfig", mode: str = "full", dtype=None) -> int:
        """State bytes of one slot (ring buffers and positions), computed without allocating.
        dtype defaults to the codec's (float32 for a bare config)."""
        if isinstance(codec, CodecConfig):
            with torch.device("meta"):
                model = FocalCodecModel(codec)
            return Pipeline.bytes_per_slot(model, mode, dtype or torch.float32)
        return Pipeline.bytes_per_slot(codec.model, mode, dtype or codec.dtype)

    @staticmethod
    def max_streams_for(codec: "Codec | CodecConfig", memory_bytes: int, mode: str = "full", dtype=None) -> int:
        """Most streams whose state fits in memory_bytes (one slot is kept as scratch).
        Weights and the step's activations (see bench/serve_capacity.py) come on top."""
        return max(0, memory_bytes // StreamEngine.bytes_per_stream(codec, mode, dtype) - 1)

    @property
    def state_bytes_per_stream(self) -> int:
        return self.pipeline.nbytes // (self.max_streams + 1)

    @property
    def state_bytes(self) -> int:
        return self.pipeline.nbytes

    @property
    def tactics(self) -> dict[int, dict]:
        """Batch bucket -> the tactic its graph was captured with, where start-up timed one or
        `tactics=` fixed it (empty: defaults everywhere, e.g. on CPU); `self.runner.timings`
        has the times of the timed buckets."""
        return dict(self.runner.tactics)

    # ------------------------------------------------------------------ streams
    @property
    def streams(self) -> list[int]:
        """Open stream ids, in the order their rows appear in a step (slot order)."""
        return [int(s) for s in self._sid[self._sid >= 0]]

    def __len__(self) -> int:
        return len(self._slot)

    def _get(self, sid) -> int:
        slot = self._slot.get(sid)
        if slot is None:
            state = "closed" if isinstance(sid, int) and 0 <= sid < self._next_id else "unknown"
            raise KeyError(f"stream {sid!r} is {state}")
        return slot

    def _slots_of(self, sids) -> np.ndarray:
        """Slots of many stream ids in one vectorised search (ids never reuse, so the open ones
        sorted with their slots answer it; rebuilt after an open or close)."""
        a = np.asarray(sids)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            return np.fromiter((self._get(s) for s in (a.tolist() if a.ndim else [sids])), np.int64)
        if self._lookup is None:
            open_slots = np.flatnonzero(self._sid >= 0)
            order = np.argsort(self._sid[open_slots], kind="stable")
            self._lookup = (self._sid[open_slots][order], open_slots[order])
        keys, slots = self._lookup
        if not a.size:
            return np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(keys, a), max(len(keys) - 1, 0))
        ok = keys[pos] == a if len(keys) else np.zeros(a.shape, bool)
        if not ok.all():
            self._get(a[np.flatnonzero(~ok)[0]].item())  # raises, naming the id
        return slots[pos]

    def slot_of(self, sid: int) -> int:
        """The state slot a stream runs on (rows of `states` tensors)."""
        return self._get(sid)

    def open(self) -> int:
        """Start a stream on a free slot (reset in place); returns its id (never reused)."""
        if not self._free:
            raise EngineFull(f"all {self.max_streams} streams are open: close one or build a larger engine")
        slot = self._free.pop()
        self.pipeline.reset(self._slot_ids[slot:slot + 1])
        sid = self._next_id
        self._next_id += 1
        self._slot[sid] = slot
        self._lookup = None
        self._sid[slot], self._head[slot], self._fill[slot], self._err[slot] = sid, 0, 0, 0
        return sid

    def close(self, sid: int) -> None:
        """Drop a stream and its pending input; its slot is free for the next open()."""
        slot = self._get(sid)
        del self._slot[sid]
        self._lookup = None
        self._sid[slot], self._fill[slot], self._head[slot] = -1, 0, 0  # every head on a chunk boundary (_grow)
        self._over.pop(slot, None)
        self._free.append(slot)

    def pending(self, sid: int) -> int:
        """Samples (or tokens) buffered for this stream."""
        slot = self._get(sid)
        return int(self._fill[slot]) + (self._over[slot][1] if slot in self._over else 0)

    def error(self, sid: int) -> str | None:
        return ERRORS.get(int(self._err[self._get(sid)]))

    @property
    def _cap(self) -> int:
        """Elements each slot's ring holds."""
        return self._ring.shape[0] * self.chunk

    def _new_ring(self, depth: int) -> np.ndarray:
        return torch.zeros(depth, self.max_streams, self.chunk, dtype=self._ring_dtype, pin_memory=self._pin).numpy()

    def submit(self, sid: int, data) -> None:
        """Append samples (16 kHz float, shape (n,) or (1, n)) or tokens (integers in the
        codebook) to a stream. Any n; whole chunks are stepped by step()."""
        slot = self._get(sid)
        v = stream_piece(data, self._piece_name(sid), self._codebook)
        n = v.shape[0]
        if not n:
            return
        fill = self._fill.item(slot)  # .item(): numpy scalar reads are the cost of a submit
        need = fill + n
        if slot in self._over or (need > self._cap and not self._grow(need)):
            # before anything is written: a refused submit leaves the stream as it was
            self._check_backlog(self._kept(slot, n), f"stream {sid}")
            self._spill(slot, v)
            return
        self._write(slot, v)

    def _write(self, slot: int, v: np.ndarray) -> None:
        """Append v (fits) to slot's ring."""
        n, fill = v.shape[0], self._fill.item(slot)
        need = fill + n
        w = (self._head.item(slot) + fill) % self._cap
        d, off = divmod(w, self.chunk)
        if off + n <= self.chunk:  # within one chunk row: the usual case, kept cheap
            self._ring[d, slot, off:off + n] = v
        else:
            for d, off, i, m in self._pieces(w, n):
                self._ring[d, slot, off:off + m] = v[i:i + m]
        self._fill[slot] = need

    def _kept(self, slot: int, n: int) -> int:
        """How many of n new elements for slot would go to its backlog."""
        room = 0 if slot in self._over else self._cap - self._fill.item(slot)
        return max(n - max(room, 0), 0)

    def _check_backlog(self, kept: int, who: str) -> None:
        check_fits(kept * np.dtype(self._np_in).itemsize, "cpu",
                   f"a backlog of {kept:,} {'tokens' if self.mode == 'decode' else 'samples'} for {who}",
                   "submit less at a time (step() between submits)")

    def _spill(self, slot: int, v: np.ndarray) -> None:
        """Fill slot's ring, keep the rest of v as its backlog (a copy: the caller may reuse v).
        The caller has checked that the backlog fits (`_check_backlog`)."""
        room = 0 if slot in self._over else self._cap - self._fill.item(slot)
        if room > 0:
            self._write(slot, v[:room])
        rest = np.array(v[room:], dtype=self._np_in)
        if rest.shape[0]:
            q = self._over.setdefault(slot, [collections.deque(), 0])
            q[0].append(rest)
            q[1] += rest.shape[0]

    def _refill(self) -> None:
        """Move backlog into the rings where a step freed room (a loop over the few backlogged slots)."""
        for slot in list(self._over):
            q, total = self._over[slot]
            room = self._cap - self._fill.item(slot)
            while room > 0 and q:
                a = q[0]
                m = min(room, a.shape[0])
                self._write(slot, a[:m])
                if m == a.shape[0]:
                    q.popleft()
                else:
                    q[0] = a[m:]
                room -= m
                total -= m
            if q:
                self._over[slot][1] = total
            else:
                del self._over[slot]

    def submit_batch(self, sids, data) -> None:
        """submit(sids[i], data[i]) for many streams at once: data (k, n) holds n samples (or
        tokens) for each of k distinct streams; one vectorised write instead of k calls."""
        slots = self._slots_of(sids)
        if len(slots) > 1 and np.bincount(slots).max() > 1:
            raise InputError("submit_batch: a stream appears twice in sids (join its pieces into one row)")
        v = np.ascontiguousarray(stream_batch(data, len(slots), "tokens" if self.mode == "decode" else "audio",
                                              self._codebook))  # nothing is written before every check passed
        n = v.shape[1]
        if not n or not len(slots):
            return
        need = self._fill[slots] + n
        if int(need.max()) > self._cap and not self._grow(int(need.max())) or self._over:
            # rows that do not fit (or already have a backlog) go one by one, through the backlog
            late = (need > self._cap) | np.isin(slots, list(self._over))
            if late.any():
                rows = np.flatnonzero(late).tolist()
                # every row's backlog checked together, before the first is written: a refused
                # batch leaves every stream as it was (a retry must not feed one twice)
                kept = sum(self._kept(int(slots[i]), n) for i in rows)
                self._check_backlog(kept, f"{len(rows)} stream{'s' if len(rows) > 1 else ''} "
                                          f"({', '.join(str(self._sid[int(slots[i])]) for i in rows[:4])}"
                                          f"{', ...' if len(rows) > 4 else ''})")
                for i in rows:
                    self._spill(int(slots[i]), v[i])
                keep = np.flatnonzero(~late)
                if not len(keep):
                    return
                slots, v, need = slots[keep], np.ascontiguousarray(v[keep]), need[keep]
        w = (self._head[slots] + self._fill[slots]) % self._cap
        # rows writing at one ring position (streams stepped together share it) take one
        # multithreaded row copy per chunk row touched; per-element fancy indexing is ~10x slower
        if (w == w[0]).all():  # the usual case: one group, no sort
            groups = [(int(w[0]), np.arange(len(slots)))]
        else:
            order = np.argsort(w, kind="stable")
            wo = w[order]
            starts = np.flatnonzero(np.r_[True, wo[1:] != wo[:-1]])
            groups = zip(wo[starts].tolist(), np.split(order, starts[1:]))
        ring, vt = torch.from_numpy(self._ring), torch.from_numpy(v)
        for pos, grp in groups:
            # one group: every row at one position, and the stable sort left them in order
            src = vt if len(grp) == len(slots) else vt[torch.from_numpy(grp)]
            sl = slots[grp]
            lo = int(sl[0])
            run = bool((np.diff(sl) == 1).all())  # consecutive slots: a plain strided copy, ~20% faster
            rows = None if run else torch.from_numpy(sl)
            for d, off, i, m in self._pieces(pos, n):
                if run:
                    ring[d, lo:lo + len(sl), off:off + m].copy_(src[:, i:i + m])
                else:
                    ring[d, :, off:off + m].index_copy_(0, rows, src[:, i:i + m])
        self._fill[slots] = need

    def _pieces(self, pos: int, n: int) -> list[tuple[int, int, int, int]]:
        """n elements written from ring position pos as (chunk row, offset, start in the
        input, length): one piece per chunk row touched, wrapping at the ring's end."""
        out, i, C = [], 0, self.chunk
        while i < n:
            d, off = divmod(pos, C)
            m = min(n - i, C - off)
            out.append((d, off, i, m))
            i += m
            pos = (pos + m) % self._cap
        return out

    def _piece_name(self, sid) -> str:
        return f"{'tokens' if self.mode == 'decode' else 'audio'} of stream {sid}"

    def _positions(self, slots: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk row, offset) of the first n pending elements of each slot, (len(slots), n) each."""
        p = (self._head[slots, None] + np.arange(n)) % self._cap
        return p // self.chunk, p % self.chunk

    def _grow(self, need: int) -> bool:
        """Double the rings until `need` fits, unwrapping each slot's pending input to the front;
        False (nothing done) where that would pass MAX_RING_CHUNKS: a longer backlog is one
        stream's, kept apart (`_spill`), not room in every slot's ring."""
        depth = self._ring.shape[0]
        new_depth = depth
        while new_depth * self.chunk < need:
            new_depth *= 2
        if new_depth > max(MAX_RING_CHUNKS, depth):
            return False
        S = self.max_streams
        check_fits(S * new_depth * self.chunk * self._ring.itemsize + self._ring.nbytes, "cpu",
                   f"input rings of {new_depth * self.chunk} per stream")  # the new rings + one copy of the old
        # heads sit on chunk boundaries (0 at open and close, += chunk a step): whole chunk rows move
        rows = (self._head[None, :] // self.chunk + np.arange(depth)[:, None]) % depth  # (depth, S), oldest first
        ring = self._new_ring(new_depth)
        ring[:depth] = self._ring[rows, np.arange(S)[None, :]]
        self._ring, self._head = ring, np.zeros_like(self._head)
        return True

    def _take(self, slots: np.ndarray, n: int, out: np.ndarray) -> None:
        """Pop the first n pending elements of each slot into out (len(slots), n)."""
        d, off = self._positions(slots, n)
        out[...] = self._ring[d, slots[:, None], off]
        self._head[slots] = (self._head[slots] + n) % self._cap
        self._fill[slots] -= n

    def _take_chunks(self, slots: np.ndarray, out: Tensor) -> Tensor:
        """_take of one chunk per slot (sorted): a step's input, (len(slots), chunk). Heads sit on
        chunk boundaries (0 at open, += chunk per step, cap a multiple of chunk), so each chunk
        is one row of the ring viewed as (cap/chunk * slots, chunk). Consecutive slots at one
        ring position: a view of the ring, no copy. Otherwise one index_select into out
        (multithreaded row copies; 21 MB at 4,096 audio streams), which it returns."""
        n, S = self.chunk, self.max_streams
        d = self._head[slots] // n
        k = len(slots)
        if int(slots[-1]) - int(slots[0]) == k - 1 and (d == d[0]).all():
            x = torch.from_numpy(self._ring[int(d[0]), int(slots[0]):int(slots[0]) + k])
        else:
            rows = torch.from_numpy(d * S + slots)
            torch.index_select(torch.from_numpy(self._ring).view(-1, n), 0, rows, out=out)
            x = out
        self._head[slots] = (self._head[slots] + n) % self._cap
        self._fill[slots] -= n
        return x

    # ------------------------------------------------------------------ stepping
    def _ready_slots(self) -> np.ndarray:
        return np.flatnonzero((self._sid >= 0) & (self._fill >= self.chunk))

    def ready(self) -> list[int]:
        """Ids of the streams the next step() will advance."""
        return [int(s) for s in self._sid[self._ready_slots()]]

    def step_batch(self) -> StepResult:
        """One batched chunk for every stream with a whole chunk buffered; others untouched.
        Outputs as batched tensors (no per-stream objects). One host sync."""
        slots = self._ready_slots()
        n = len(slots)
        names = MODE_OUTPUTS[self.mode]
        if not n:
            z = torch.zeros(0, device=self.device)
            return StepResult(np.zeros(0, np.int64), z.long().view(0, 4) if "toks" in names else None,
                              z.view(0, 0) if "audio" in names else None, np.zeros(0, np.int32))
        with nvtx_range("engine.step"), torch.inference_mode():
            x = self._take_chunks(slots, self._host_in[:n])
            self._host_idx.numpy()[:n] = slots
            outs = self.runner.run(n, [x], self._host_idx[:n])  # copies x into its static input
            # graph outputs are static views: copy before the next step; audio leaves as float32
            copy = bool(self.runner.graphs)
            res = {k: (o.to(torch.float32, copy=copy) if o.is_floating_point() else (o.clone() if copy else o))
                   for k, o in zip(names, outs)}
            err = outs[-1].cpu().numpy()  # a sync: the copy of x (maybe a view of the rings) is done
        if self._over:
            self._refill()
        sticky = self._err[slots]
        self._err[slots] = np.where(sticky != 0, sticky, err)
        return StepResult(self._sid[slots].copy(), res.get("toks"), res.get("audio"), self._err[slots].copy())

    def step(self) -> dict[int, StreamOutput]:
        """step_batch as stream id -> StreamOutput (4 tokens and/or 1920 samples each)."""
        r = self.step_batch()
        errs = [ERRORS.get(e) for e in r.errors.tolist()] if r.errors.any() else itertools.repeat(None)
        return dict(zip(r.ids.tolist(), map(StreamOutput._of_row, itertools.repeat(r.tokens),
                                            itertools.repeat(r.audio), range(len(r)), errs)))

    def finish(self, sid: int) -> StreamOutput:
        """End a stream now: run everything it has pending (whole chunks and a zero-padded
        partial one) for that slot alone, eagerly, then close it. Like Stream.flush: one token
        per started 20 ms frame, and a last partial token group decoded as offline does."""
        slot = self._get(sid)
        names = MODE_OUTPUTS[self.mode]
        n = int(self._fill[slot])
        backlog = self._over.pop(slot, [(), 0])[0]
        if n or backlog:
            x = np.empty((1, n), self._np_in)
            self._take(np.array([slot]), n, x)
            if backlog:
                x = np.concatenate([x[0], *backlog])[None]
            with nvtx_range("engine.finish"), torch.inference_mode():
                xt = torch.from_numpy(x).to(self.device, self.dtype if self.mode != "decode" else torch.long)
                o = self.pipeline.run_tail(xt, self._slot_ids[slot:slot + 1], names, self.codec.segment_frames)
                code = int(o["err"][0])
            if code and not self._err[slot]:
                self._err[slot] = code
            out = StreamOutput(o["toks"][0] if "toks" in o else None,
                               o["audio"][0].float() if "audio" in o else None, self.error(sid))
        else:
            e = torch.zeros(0, device=self.device)
            out = StreamOutput(e.long() if "toks" in names else None, e if "audio" in names else None, self.error(sid))
        self.close(sid)
        return out
