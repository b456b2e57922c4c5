"""Streaming sessions: a batch of streams advanced in lockstep, one 80 ms chunk at a time.

State is preallocated (ring buffers, constant size); `push` takes any number of samples or
tokens and returns what is complete; `flush` ends the stream (zero-padding a partial chunk)
and leaves the session ready for a new one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .codec import Codec, InputError
from .state import decoder_side, encoder_side


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


class StreamEncoder(_Session):
    """16 kHz audio in, tokens out (4 per 1280-sample chunk)."""

    def __init__(self, codec: Codec, batch_size: int = 1):
        super().__init__(codec, batch_size)
        cfg = codec.config
        self.enc_state, self.comp_state = encoder_side(cfg, batch_size, codec.device, codec.dtype)
        self.chunk = codec.chunk_size
        self.hop = cfg.hop_samples
        self._buf = torch.zeros(batch_size, self.chunk, device=codec.device, dtype=codec.dtype)
        self._fill = 0

    @property
    def pending(self) -> int:
        """Samples buffered towards the next chunk."""
        return self._fill

    @property
    def state_bytes(self) -> int:
        return self.enc_state.nbytes + self.comp_state.nbytes + self._buf.numel() * self._buf.element_size()

    def _step(self, sig: Tensor) -> tuple[Tensor, Tensor]:
        m = self.codec.model
        feats = m.encoder(sig, self.enc_state, self.idx)
        lats = m.compressor(feats, self.comp_state, self.idx)
        return ops.bsq_quantize(lats)

    def _push(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._batch(x)
        if x.shape[1] == 0:
            return self._empty()
        x, _ = self.codec._check_sig(x)
        with torch.inference_mode():
            take = min(self.chunk - self._fill, x.shape[1])
            self._buf[:, self._fill:self._fill + take] = x[:, :take]
            self._fill += take
            rest = x[:, take:]
            if self._fill < self.chunk:
                return self._empty()
            n_whole = (rest.shape[1] // self.chunk) * self.chunk
            # the buffered chunk and every whole chunk after it go in one step
            sig = torch.cat([self._buf, rest[:, :n_whole]], 1) if n_whole else self._buf.clone()
            tail = rest[:, n_whole:]
            self._buf[:, :tail.shape[1]] = tail
            self._fill = tail.shape[1]
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

    def __init__(self, codec: Codec, batch_size: int = 1):
        super().__init__(codec, batch_size)
        cfg = codec.config
        self.dec_state, self.wav_state = decoder_side(cfg, batch_size, codec.device, codec.dtype)
        self.group = cfg.chunk_frames
        self._buf = torch.zeros(batch_size, self.group, dtype=torch.long, device=codec.device)
        self._fill = 0

    @property
    def pending(self) -> int:
        return self._fill

    @property
    def state_bytes(self) -> int:
        return self.dec_state.nbytes + self.wav_state.nbytes + self._buf.numel() * self._buf.element_size()

    def _step_codes(self, codes: Tensor) -> Tensor:
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
        toks, _ = self.codec._check_toks(toks)
        with torch.inference_mode():
            take = min(self.group - self._fill, toks.shape[1])
            self._buf[:, self._fill:self._fill + take] = toks[:, :take]
            self._fill += take
            rest = toks[:, take:]
            if self._fill < self.group:
                return self._empty()
            n_whole = (rest.shape[1] // self.group) * self.group
            t = torch.cat([self._buf, rest[:, :n_whole]], 1)
            tail = rest[:, n_whole:]
            self._buf[:, :tail.shape[1]] = tail
            self._fill = tail.shape[1]
            return self._step_codes(ops.bsq_codes(t, self.codec.code_dim, self.codec.dtype))

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
                out = self._step_codes(ops.bsq_codes(t, self.codec.code_dim, self.codec.dtype))
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

    def __init__(self, codec: Codec, batch_size: int = 1):
        self.codec = codec
        self.encoder = StreamEncoder(codec, batch_size)
        self.decoder = StreamDecoder(codec, batch_size)

    @property
    def state_bytes(self) -> int:
        return self.encoder.state_bytes + self.decoder.state_bytes

    def push(self, sig) -> tuple[Tensor, Tensor]:
        """Returns (tokens, audio) completed by these samples."""
        from .codec import _as_tensor

        toks, codes = self.encoder._push(_as_tensor(sig, "audio"))
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
