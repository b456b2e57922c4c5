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

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import CodecConfig
from .graphs import GraphRunner, buckets_for, graphs_enabled
from .inputs import DTYPES, InputError, as_tensor, check_fits, check_tokens, one_stream, positive_int
from .model import FocalCodecModel
from .pipeline import ERRORS, MODE_OUTPUTS, MODES, Pipeline
from .profiling import nvtx_range
from .streaming import check_codec

if TYPE_CHECKING:
    from .codec import Codec


class EngineFull(RuntimeError):
    """open() with every slot taken."""


@dataclasses.dataclass
class StreamOutput:
    """What one stream produced: tokens (int64) and/or float32 audio at the output rate, on
    the engine's device. error is None, 'non-finite input', 'input out of range' or
    'non-finite output' (sticky: once set, the stream's outputs are garbage until it is closed)."""

    tokens: Tensor | None = None
    audio: Tensor | None = None
    error: str | None = None


@dataclasses.dataclass
class _Stream:
    slot: int
    buf: Tensor  # pending samples or tokens, on the host
    error: str | None = None


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class StreamEngine:
    """A fixed pool of `max_streams` stream slots stepped together, one chunk per step.

    mode: "full" (audio in, tokens + audio out), "encode" (audio in, tokens out) or
    "decode" (tokens in, audio out). device/dtype default to the codec's and must match it
    (load the codec where the engine should run). cuda_graphs: capture the step per batch
    bucket on CUDA (FASTFOCAL_CUDA_GRAPHS=0 turns it off); capture happens here, at start-up.

    Inputs are buffered on the host (a CUDA tensor passed to submit is copied back, which
    syncs); each step copies the ready chunks in once. Not thread-safe: drive it from one loop.
    """

    def __init__(self, codec: Codec, max_streams: int, mode: str = "full", device=None, dtype=None,
                 cuda_graphs: bool = True):
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
        per_slot = Pipeline.bytes_per_slot(codec.model, mode, self.dtype)
        check_fits((max_streams + 1) * per_slot + 3 * max_streams * self.chunk * torch.finfo(self.dtype).bits // 8,
                   self.device, f"a {mode} engine of {max_streams} streams ({per_slot / 2**20:.3g} MiB of state each)")
        self.pipeline = Pipeline(codec.model, mode, max_streams + 1)
        self.states = self.pipeline.states
        self._slot_ids = torch.arange(max_streams + 1, device=self.device)
        self.runner = GraphRunner(self.pipeline.step, [((self.chunk,), in_dtype)], buckets_for(max_streams),
                                  self.device, self.scratch, use_graphs=graphs_enabled(self.device, cuda_graphs))
        on_gpu = self.device.type == "cuda"
        # host staging: pinned on CUDA (async copy in); on CPU it is the static buffer itself
        self._host_in = (torch.zeros(max_streams, self.chunk, dtype=in_dtype, pin_memory=True) if on_gpu
                         else self.runner.inputs[0])
        self._host_idx = torch.zeros(max_streams, dtype=torch.long, pin_memory=True) if on_gpu else self.runner.idx
        self._streams: dict[int, _Stream] = {}
        self._free = list(range(max_streams - 1, -1, -1))  # pop(): lowest first, then the last freed
        self._next_id = 0
        self.runner.capture()

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

    # ------------------------------------------------------------------ streams
    @property
    def streams(self) -> list[int]:
        """Open stream ids, in the order their rows appear in a step."""
        return list(self._streams)

    def __len__(self) -> int:
        return len(self._streams)

    def _get(self, sid) -> _Stream:
        s = self._streams.get(sid)
        if s is None:
            state = "closed" if isinstance(sid, int) and 0 <= sid < self._next_id else "unknown"
            raise KeyError(f"stream {sid!r} is {state}")
        return s

    def open(self) -> int:
        """Start a stream on a free slot (reset in place); returns its id (never reused)."""
        if not self._free:
            raise EngineFull(f"all {self.max_streams} streams are open: close one or build a larger engine")
        slot = self._free.pop()
        self.pipeline.reset(self._slot_ids[slot:slot + 1])
        sid = self._next_id
        self._next_id += 1
        in_dtype = torch.long if self.mode == "decode" else self.dtype
        self._streams[sid] = _Stream(slot, torch.zeros(0, dtype=in_dtype))
        return sid

    def close(self, sid: int) -> None:
        """Drop a stream and its pending input; its slot is free for the next open()."""
        s = self._get(sid)
        del self._streams[sid]
        self._free.append(s.slot)

    def pending(self, sid: int) -> int:
        """Samples (or tokens) buffered for this stream."""
        return self._get(sid).buf.numel()

    def error(self, sid: int) -> str | None:
        return self._get(sid).error

    def submit(self, sid: int, data) -> None:
        """Append samples (16 kHz float, shape (n,) or (1, n)) or tokens (integers in the
        codebook) to a stream. Any n; whole chunks are stepped by step()."""
        s = self._get(sid)
        what = "tokens" if self.mode == "decode" else "audio"
        x = one_stream(as_tensor(data, what), f"{what} of stream {sid}")
        if x.device.type != "cpu":
            x = x.cpu()
        if self.mode == "decode":
            if x.numel():
                x = check_tokens(x, self.codec.codebook_size, f"tokens of stream {sid}")[0][0]
            elif x.is_floating_point():
                raise InputError(f"tokens of stream {sid} must be an integer tensor, got {x.dtype}")
            x = x.long()
        else:
            if not x.is_floating_point():
                raise InputError(f"audio of stream {sid} must be floating point in [-1, 1], got {x.dtype} "
                                 "(convert integer PCM with x / 32768)")
            # NaN/Inf and out-of-range samples pass through: the step flags this stream only
            x = x.to(self.dtype)
        if x.numel():
            s.buf = torch.cat([s.buf, x]) if s.buf.numel() else x.clone()

    # ------------------------------------------------------------------ stepping
    def ready(self) -> list[int]:
        """Ids of the streams the next step() will advance."""
        return [sid for sid, s in self._streams.items() if s.buf.numel() >= self.chunk]

    def step(self) -> dict[int, StreamOutput]:
        """One batched chunk for every stream with a whole chunk buffered; others untouched.
        Returns stream id -> StreamOutput (4 tokens and/or 1920 samples). One host sync."""
        ready = [(sid, self._streams[sid]) for sid in self.ready()]
        if not ready:
            return {}
        n = len(ready)
        with nvtx_range("engine.step"), torch.inference_mode():
            torch.stack([s.buf[:self.chunk] for _, s in ready], out=self._host_in[:n])
            self._host_idx.numpy()[:n] = [s.slot for _, s in ready]
            for _, s in ready:
                s.buf = s.buf[self.chunk:]
            if self.device.type == "cuda":
                outs = self.runner.run(n, [self._host_in[:n]], self._host_idx[:n])
            else:  # rows were written straight into the static buffers
                outs = self.runner.run(n)
            # static views: copy before the next step; audio leaves as float32
            outs = [o.to(torch.float32, copy=True) if o.is_floating_point() else o.clone() for o in outs[:-1]] + [outs[-1].cpu()]
        return self._results(ready, outs)

    def _results(self, ready, outs) -> dict[int, StreamOutput]:
        err = outs[-1].tolist()
        names = MODE_OUTPUTS[self.mode]
        res = {}
        for i, (sid, s) in enumerate(ready):
            if err[i] and s.error is None:
                s.error = ERRORS[err[i]]
            o = {k: v[i] for k, v in zip(names, outs)}
            res[sid] = StreamOutput(o.get("toks"), o.get("audio"), s.error)
        return res

    def finish(self, sid: int) -> StreamOutput:
        """End a stream now: run everything it has pending (whole chunks and a zero-padded
        partial one) for that slot alone, eagerly, then close it. Like Stream.flush: one token
        per started 20 ms frame, and a last partial token group decoded as offline does."""
        s = self._get(sid)
        out = StreamOutput(error=s.error)
        names = MODE_OUTPUTS[self.mode]
        if s.buf.numel():
            with nvtx_range("engine.finish"), torch.inference_mode():
                o = self.pipeline.run_tail(s.buf.to(self.device)[None], self._slot_ids[s.slot:s.slot + 1], names,
                                           self.codec.segment_frames)
                code = int(o["err"][0])
                if code and s.error is None:
                    s.error = ERRORS[code]
            out = StreamOutput(o["toks"][0] if "toks" in o else None,
                               o["audio"][0].float() if "audio" in o else None, s.error)
        else:
            e = torch.zeros(0, device=self.device)
            out.tokens = e.long() if "toks" in names else None
            out.audio = e if "audio" in names else None
        self.close(sid)
        return out
