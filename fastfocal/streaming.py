"""Streaming sessions: a batch of streams advanced in lockstep, one 80 ms chunk at a time.

State is preallocated (ring buffers, constant size); `push` takes any number of samples or
tokens and returns what is complete; `flush` ends the stream (zero-padding a partial chunk)
and leaves the session ready for a new one.

On CUDA each session captures its chunk step as a CUDA graph for its batch size when built
(FASTFOCAL_CUDA_GRAPHS=0 or cuda_graphs=False: eager), so a push of k whole chunks is k graph
replays; CPU sessions run eagerly, all whole chunks of a push in one step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .codec import Codec, InputError
from .engine import make_step
from .graphs import GraphRunner, graphs_enabled
from .state import decoder_side, encoder_side


def _graph(codec: Codec, mode: str, idx: Tensor, cuda_graphs: bool | None, **states) -> GraphRunner | None:
    """The chunk step captured for this batch (bucket = batch size), or None (CPU, off, failed).
    Warm-up and capture step slot 0 for real: the caller resets its states afterwards."""
    if not graphs_enabled(codec.device, cuda_graphs):
        return None
    shape, dt = ((codec.chunk_size,), codec.dtype) if mode != "decode" else ((codec.config.chunk_frames,), torch.long)
    r = GraphRunner(make_step(codec, mode, **states), [(shape, dt)], [idx.numel()], codec.device, 0, use_graphs=True)
    if not r.capture():
        return None
    r.idx.copy_(idx)
    return r


def _replay(r: GraphRunner, x: Tensor, width: int) -> list[Tensor]:
    """Run x (B, k*width) through the graph one chunk at a time; outputs joined along time
    (copied out of the static buffers before the next replay)."""
    outs = [[o.clone() for o in r.run(x.shape[0], [x[:, a:a + width]])] for a in range(0, x.shape[1], width)]
    return outs[0] if len(outs) == 1 else [torch.cat(o, 1) for o in zip(*outs)]


class _Session:
    def __init__(self, codec: Codec, batch_size: int):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.codec = codec
        self.batch_size = batch_size
        self.idx = torch.arange(batch_size, device=codec.device)

    def _rows(self, rows) -> Tensor:
        if rows is None:
            return self.idx
        r = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= self.batch_size):
            raise InputError(f"rows must be in [0, {self.batch_size}), got {r.tolist()}")
        return r.to(self.codec.device)

    def _batch(self, x: Tensor) -> Tensor:
        if x.dim() == 1 and self.batch_size == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2 or x.shape[0] != self.batch_size:
            raise InputError(f"expected shape ({self.batch_size}, n), got {tuple(x.shape)}")
        return x

    def _states(self) -> tuple:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        """Samples (encoder) or tokens (decoder) buffered towards the next step."""
        return self._fill

    @property
    def state_bytes(self) -> int:
        return sum(st.nbytes for st in self._states()) + self._buf.numel() * self._buf.element_size()

    def _buffer(self, x: Tensor, unit: int) -> Tensor | None:
        """Append validated x (batch, n) to the partial-unit buffer; return the buffered unit and
        every whole unit after it, joined for one step (None while the unit is incomplete)."""
        with torch.inference_mode():
            take = min(unit - self._fill, x.shape[1])
            self._buf[:, self._fill:self._fill + take] = x[:, :take]
            self._fill += take
            rest = x[:, take:]
            if self._fill < unit:
                return None
            n_whole = (rest.shape[1] // unit) * unit
            out = torch.cat([self._buf, rest[:, :n_whole]], 1) if n_whole else self._buf.clone()
            tail = rest[:, n_whole:]
            self._buf[:, :tail.shape[1]] = tail
            self._fill = tail.shape[1]
            return out


class StreamEncoder(_Session):
    """16 kHz audio in, tokens out (4 per 1280-sample chunk)."""

    def __init__(self, codec: Codec, batch_size: int = 1, cuda_graphs: bool | None = None):
        super().__init__(codec, batch_size)
        cfg = codec.config
        self.enc_state, self.comp_state = encoder_side(cfg, batch_size, codec.device, codec.dtype)
        self.chunk = codec.chunk_size
        self.hop = cfg.hop_samples
        self._buf = torch.zeros(batch_size, self.chunk, device=codec.device, dtype=codec.dtype)
        self._fill = 0
        self._graph = _graph(codec, "encode", self.idx, cuda_graphs, enc=self.enc_state, comp=self.comp_state)
        if self._graph is not None:
            self.reset()

    def _states(self) -> tuple:
        return self.enc_state, self.comp_state

    def _step(self, sig: Tensor) -> tuple[Tensor, Tensor]:
        if self._graph is not None:
            return tuple(_replay(self._graph, sig, self.chunk)[:2])
        m = self.codec.model
        feats = m.encoder(sig, self.enc_state, self.idx)
        _, toks, codes = m.compressor(feats, self.comp_state, self.idx, quantize=True)
        return toks, codes

    def _take(self, x: Tensor) -> Tensor | None:
        """Buffer x; return the whole chunks it completes (batch, 1280k), or None."""
        x = self._batch(x)
        if x.shape[1] == 0:
            return None
        return self._buffer(self.codec._check_sig(x)[0], self.chunk)

    def _push(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sig = self._take(x)
        if sig is None:
            return self._empty()
        with torch.inference_mode():
            return self._step(sig)

    def _empty(self) -> tuple[Tensor, Tensor]:
        d = self.codec.code_dim
        return (
            torch.zeros(self.batch_size, 0, dtype=torch.long, device=self.codec.device),
            torch.zeros(self.batch_size, 0, d, dtype=self.codec.dtype, device=self.codec.device),
        )

    def push(self, sig) -> Tensor:
        """Append samples (batch, n) for every stream; return the tokens (batch, 4k) now complete."""
        from .codec import _as_tensor

        return self._push(_as_tensor(sig, "audio"))[0]

    def _flush(self) -> tuple[Tensor, Tensor]:
        if self._fill == 0:
            out = self._empty()
        else:
            n_tok = -(-self._fill // self.hop)
            with torch.inference_mode():
                self._buf[:, self._fill:] = 0
                toks, codes = self._step(self._buf.clone())
            out = toks[:, :n_tok], codes[:, :n_tok]
        self.reset()
        return out

    def flush(self) -> Tensor:
        """End the streams: zero-pad the partial chunk, return its tokens (one per started
        20 ms frame), and reset the session."""
        return self._flush()[0]

    def reset(self, rows=None) -> None:
        """Start new streams in `rows` (all when None). Rows can only be reset at a chunk
        boundary, since the streams of a session share one input clock."""
        r = self._rows(rows)
        if rows is not None and self._fill:
            raise InputError(
                f"reset(rows) with {self._fill} samples pending: reset rows at a chunk boundary "
                "(push whole 1280-sample chunks), or use StreamEngine for streams with their own clocks"
            )
        self.enc_state.reset(r)
        self.comp_state.reset(r)
        if rows is None:
            self._buf.zero_()
            self._fill = 0


class StreamDecoder(_Session):
    """Tokens in (4 per step), 24 kHz audio out (1920 samples per step)."""

    def __init__(self, codec: Codec, batch_size: int = 1, cuda_graphs: bool | None = None):
        super().__init__(codec, batch_size)
        cfg = codec.config
        self.dec_state, self.wav_state = decoder_side(cfg, batch_size, codec.device, codec.dtype)
        self.group = cfg.chunk_frames
        self._buf = torch.zeros(batch_size, self.group, dtype=torch.long, device=codec.device)
        self._fill = 0
        self._graph = _graph(codec, "decode", self.idx, cuda_graphs, dec=self.dec_state, wav=self.wav_state)
        if self._graph is not None:
            self.reset()

    def _states(self) -> tuple:
        return self.dec_state, self.wav_state

    def _step_codes(self, codes: Tensor) -> Tensor:
        """codes (batch, T, D) or tokens (batch, T) -> audio."""
        m = self.codec.model
        q = m.decompressor(codes, self.dec_state, self.idx)
        return m.decoder(q, self.wav_state, self.idx)

    def _empty(self) -> Tensor:
        return torch.zeros(self.batch_size, 0, dtype=self.codec.dtype, device=self.codec.device)

    def push(self, toks) -> Tensor:
        """Append tokens (batch, n); return the audio (batch, 1920k) of every complete group."""
        from .codec import _as_tensor

        toks = self._batch(_as_tensor(toks, "tokens"))
        if toks.shape[1] == 0:
            return self._empty()
        t = self._buffer(self.codec._check_toks(toks)[0], self.group)
        if t is None:
            return self._empty()
        with torch.inference_mode():
            if self._graph is not None:
                return _replay(self._graph, t, self.group)[0]
            return self._step_codes(t)

    def push_codes(self, codes: Tensor) -> Tensor:
        """Whole groups of codes (batch, 4k, D) straight in (used by the full Stream)."""
        with torch.inference_mode():
            return self._step_codes(codes)

    def flush(self) -> Tensor:
        """End the streams: decode a partial group of tokens (as offline decoding does for a
        last partial group) and reset the session."""
        out = self._empty()
        if self._fill:
            with torch.inference_mode():
                t = self._buf[:, :self._fill]
                out = self._step_codes(t)
        self.reset()
        return out

    def reset(self, rows=None) -> None:
        r = self._rows(rows)
        if rows is not None and self._fill:
            raise InputError(f"reset(rows) with {self._fill} tokens pending: reset rows at a group boundary")
        self.dec_state.reset(r)
        self.wav_state.reset(r)
        if rows is None:
            self._buf.zero_()
            self._fill = 0


class Stream:
    """Audio in, tokens and audio out: encoder and decoder sessions chained per chunk."""

    def __init__(self, codec: Codec, batch_size: int = 1, cuda_graphs: bool | None = None):
        self.codec = codec
        # one graph for the whole chunk (encoder to decoder), not one per half
        self.encoder = StreamEncoder(codec, batch_size, cuda_graphs=False)
        self.decoder = StreamDecoder(codec, batch_size, cuda_graphs=False)
        self._graph = _graph(codec, "full", self.encoder.idx, cuda_graphs, enc=self.encoder.enc_state,
                             comp=self.encoder.comp_state, dec=self.decoder.dec_state, wav=self.decoder.wav_state)
        if self._graph is not None:
            self.reset()

    @property
    def state_bytes(self) -> int:
        return self.encoder.state_bytes + self.decoder.state_bytes

    def push(self, sig) -> tuple[Tensor, Tensor]:
        """Returns (tokens, audio) completed by these samples."""
        from .codec import _as_tensor

        x = _as_tensor(sig, "audio")
        if self._graph is not None:
            whole = self.encoder._take(x)
            if whole is None:
                return self.encoder._empty()[0], self.decoder._empty()
            toks, audio, _ = _replay(self._graph, whole, self.encoder.chunk)
            return toks, audio
        toks, codes = self.encoder._push(x)
        if toks.shape[1] == 0:
            return toks, self.decoder._empty()
        return toks, self.decoder.push_codes(codes)

    def flush(self) -> tuple[Tensor, Tensor]:
        toks, _ = self.encoder._flush()
        head = self.decoder.push(toks)  # whole groups; a partial group is decoded by flush
        audio = torch.cat([head, self.decoder.flush()], 1)
        return toks, audio

    def reset(self, rows=None) -> None:
        self.encoder.reset(rows)
        self.decoder.reset(rows)
