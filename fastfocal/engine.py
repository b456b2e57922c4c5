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

import torch
from torch import Tensor

from . import ops
from .codec import Codec, InputError, _as_tensor
from .config import CodecConfig
from .graphs import GraphRunner, buckets_for, graphs_enabled
from .profiling import nvtx_range
from .state import decoder_side, encoder_side

MODES = ("full", "encode", "decode")


class EngineFull(RuntimeError):
    """open() with every slot taken."""


@dataclasses.dataclass
class StreamOutput:
    """What one stream produced: tokens (int64) and/or audio at the output rate, on the
    engine's device. error is None, 'non-finite input' or 'non-finite output' (sticky: once
    set, the stream's outputs are garbage until it is closed)."""

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


def make_step(codec: Codec, mode: str, enc=None, comp=None, dec=None, wav=None):
    """The batched chunk step over the given states, as a function of static tensors only.

    full:   (sig (B, 1280), idx) -> (toks (B, 4), audio (B, 1920), bad (B, 2))
    encode: (sig, idx) -> (toks, codes (B, 4, D), bad)
    decode: (toks (B, 4), idx) -> (audio, bad)
    bad[:, 0]: non-finite input, bad[:, 1]: non-finite latents or audio. No host sync inside.
    """
    m = codec.model

    def step(x: Tensor, idx: Tensor):
        if mode == "decode":
            bad_in = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            bad_out = bad_in
            codes = x  # the decompressor takes tokens directly (signed sum of in_proj columns)
        else:
            with nvtx_range("encoder"):
                feats = m.encoder(x, enc, idx)
            with nvtx_range("compressor+quantizer"):
                lats, toks, codes = m.compressor(feats, comp, idx, quantize=True)
            bad_in = ~torch.isfinite(x).all(1)
            bad_out = ~torch.isfinite(lats).flatten(1).all(1)
            if mode == "encode":
                return toks, codes, torch.stack([bad_in, bad_out], 1)
        with nvtx_range("decompressor"):
            q = m.decompressor(codes, dec, idx)
        with nvtx_range("decoder"):
            audio = m.decoder(q, wav, idx)
        bad = torch.stack([bad_in, bad_out | ~torch.isfinite(audio).all(1)], 1)
        return (audio, bad) if mode == "decode" else (toks, audio, bad)

    return step


def _states(cfg, mode: str, slots: int, device, dtype) -> dict:
    st = {}
    if mode != "decode":
        st["enc"], st["comp"] = encoder_side(cfg, slots, device, dtype)
    if mode != "encode":
        st["dec"], st["wav"] = decoder_side(cfg, slots, device, dtype)
    return st


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
        if not isinstance(codec, Codec):
            raise InputError(f"codec must be a fastfocal.Codec, got {type(codec).__name__}")
        codec._need_causal()
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(max_streams, int) or isinstance(max_streams, bool) or max_streams < 1:
            raise InputError(f"max_streams must be a positive integer, got {max_streams!r}")
        if device is not None and not _same_device(torch.device(device), codec.device):
            raise InputError(f"device {device} differs from the codec's ({codec.device}): load the codec there")
        if isinstance(dtype, str):
            from . import _DTYPES  # late: the package imports this module

            dtype = _DTYPES.get(dtype, dtype)
        if dtype is not None and dtype != codec.dtype:
            raise InputError(f"dtype {dtype} differs from the codec's ({codec.dtype}): load the codec with it")
        self.codec, self.mode, self.max_streams = codec, mode, max_streams
        self.device, self.dtype = codec.device, codec.dtype
        cfg = codec.config
        self.chunk = codec.chunk_size if mode != "decode" else cfg.chunk_frames  # samples or tokens in
        self.hop = cfg.token_hop
        self.scratch = max_streams  # padding rows (and graph warm-up) run on this slot
        self.states = _states(cfg, mode, max_streams + 1, self.device, self.dtype)
        self._slot_ids = torch.arange(max_streams + 1, device=self.device)
        in_dtype = torch.long if mode == "decode" else self.dtype
        step = make_step(codec, mode, self.states.get("enc"), self.states.get("comp"),
                         self.states.get("dec"), self.states.get("wav"))
        self.runner = GraphRunner(step, [((self.chunk,), in_dtype)], buckets_for(max_streams), self.device,
                                  self.scratch, use_graphs=graphs_enabled(self.device, cuda_graphs))
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
    def bytes_per_stream(codec: Codec | CodecConfig, mode: str = "full", dtype=None) -> int:
        """State bytes of one slot (ring buffers and positions), computed without allocating.
        dtype defaults to the codec's (float32 for a bare config)."""
        cfg = codec if isinstance(codec, CodecConfig) else codec.config
        dtype = dtype or (torch.float32 if isinstance(codec, CodecConfig) else codec.dtype)
        return sum(s.nbytes for s in _states(cfg, mode, 1, "meta", dtype).values())

    @staticmethod
    def max_streams_for(codec: Codec | CodecConfig, memory_bytes: int, mode: str = "full", dtype=None) -> int:
        """Most streams whose state fits in memory_bytes (one slot is kept as scratch).
        Weights and the step's activations (see bench/serve_capacity.py) come on top."""
        return max(0, memory_bytes // StreamEngine.bytes_per_stream(codec, mode, dtype) - 1)

    @property
    def state_bytes_per_stream(self) -> int:
        return sum(s.nbytes for s in self.states.values()) // (self.max_streams + 1)

    @property
    def state_bytes(self) -> int:
        return sum(s.nbytes for s in self.states.values())

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
        rows = self._slot_ids[slot:slot + 1]
        for st in self.states.values():
            st.reset(rows)
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
        x = _as_tensor(data, what)
        if x.dim() == 2 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 1:
            raise InputError(f"{what} for one stream must be (n,) or (1, n), got shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            x = x.cpu()
        if self.mode == "decode":
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise InputError(f"tokens must be an integer tensor, got {x.dtype}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.codec.codebook_size):
                raise InputError(f"token out of range [0, {self.codec.codebook_size}): "
                                 f"found values in [{int(x.min())}, {int(x.max())}]")
            x = x.long()
        else:
            if not x.is_floating_point():
                raise InputError(f"audio must be floating point in [-1, 1], got {x.dtype} "
                                 "(convert integer PCM with x / 32768)")
            x = x.to(self.dtype)  # NaN/Inf pass through: the step flags them for this stream only
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
            outs = [o.clone() for o in outs[:-1]] + [outs[-1].cpu()]  # static views: copy before the next step
        return self._results(ready, outs)

    def _results(self, ready, outs) -> dict[int, StreamOutput]:
        bad = outs[-1].tolist()
        res = {}
        for i, (sid, s) in enumerate(ready):
            if bad[i][0] or bad[i][1]:
                s.error = s.error or ("non-finite input" if bad[i][0] else "non-finite output")
            if self.mode == "full":
                res[sid] = StreamOutput(outs[0][i], outs[1][i], s.error)
            elif self.mode == "encode":
                res[sid] = StreamOutput(tokens=outs[0][i], error=s.error)
            else:
                res[sid] = StreamOutput(audio=outs[0][i], error=s.error)
        return res

    def finish(self, sid: int) -> StreamOutput:
        """End a stream now: run everything it has pending (whole chunks and a zero-padded
        partial one) for that slot alone, eagerly, then close it. Like Stream.flush: one token
        per started 20 ms frame, and a last partial token group decoded as offline does."""
        s = self._get(sid)
        n = s.buf.numel()
        out = StreamOutput(error=s.error)
        if n:
            st = self.states
            m, idx = self.codec.model, self._slot_ids[s.slot:s.slot + 1]
            with nvtx_range("engine.finish"), torch.inference_mode():
                x = s.buf.to(self.device)[None]
                bad_in = bad_out = torch.zeros((), dtype=torch.bool, device=self.device)
                if self.mode == "decode":
                    codes = x
                else:
                    sig = torch.zeros(1, -(-n // self.chunk) * self.chunk, dtype=self.dtype, device=self.device)
                    sig[:, :n] = x
                    lats = m.compressor(m.encoder(sig, st["enc"], idx), st["comp"], idx)
                    n_tok = -(-n // self.hop)
                    toks, codes = ops.bsq_quantize(lats[:, :n_tok])
                    out.tokens = toks[0]
                    bad_in, bad_out = ~torch.isfinite(x).all(), ~torch.isfinite(lats[:, :n_tok]).all()
                if self.mode != "encode":
                    out.audio = m.decoder(m.decompressor(codes, st["dec"], idx), st["wav"], idx)[0]
                    bad_out = bad_out | ~torch.isfinite(out.audio).all()
                bad_in, bad_out = torch.stack([bad_in, bad_out]).tolist()
                if (bad_in or bad_out) and s.error is None:
                    s.error = "non-finite input" if bad_in else "non-finite output"
                out.error = s.error
        else:
            e = torch.zeros(0, device=self.device)
            out.tokens = None if self.mode == "decode" else e.long()
            out.audio = None if self.mode == "encode" else e.to(self.dtype)
        self.close(sid)
        return out
