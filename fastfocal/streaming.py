"""Streaming sessions: a batch of streams advanced in lockstep, one 80 ms chunk at a time.

A session is the pipeline (fastfocal.pipeline) in one mode — "encode" (StreamEncoder),
"decode" (StreamDecoder) or "full" (Stream) — over `batch_size` slots, plus a buffer for a
partial chunk. `push` takes any number of samples or tokens and returns what is complete;
`flush` ends the streams (zero-padding a partial chunk) and leaves the session ready for new
ones. Bad input raises before any state is touched.

On CUDA each session captures its chunk step as one CUDA graph for its batch size when built
(FASTFOCAL_CUDA_GRAPHS=0 or cuda_graphs=False: eager), so a push of k whole chunks is k graph
replays; elsewhere the whole chunks of a push run eagerly, in segments of bounded length.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .graphs import GraphRunner, graphs_enabled
from .inputs import InputError, as_tensor, check_audio, check_fits, check_tokens, positive_int
from .model import FocalCodecModel
from .pipeline import MODE_OUTPUTS, Pipeline, check_err


def check_codec(codec) -> None:
    """A causal fastfocal.Codec (sessions and the engine sit beside the codec, not above it)."""
    if not isinstance(getattr(codec, "model", None), FocalCodecModel):
        raise InputError(f"codec must be a fastfocal.Codec, got {type(codec).__name__}")
    if not codec.causal:
        raise InputError(f"streaming needs a causal model; {codec.name} is non-causal")


class _Session:
    mode = "full"

    def __init__(self, codec, batch_size: int = 1, cuda_graphs: bool | None = None):
        """codec: a causal fastfocal.Codec (the codec builds sessions, so this module does not import it)."""
        check_codec(codec)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.codec = codec
        check_fits(batch_size * Pipeline.bytes_per_slot(codec.model, self.mode, codec.dtype), codec.device,
                   f"streaming state for batch_size {batch_size}")
        self.pipeline = Pipeline(codec.model, self.mode, batch_size)
        self.outputs = MODE_OUTPUTS[self.mode]
        self.chunk = self.pipeline.chunk
        # a session steps every slot in order: idx None, so the modules use the state in place
        # (no row gathers: 14 fewer launches a full step on a GPU, bench/launch_count.py)
        self.idx = None
        self._in_dtype = codec.dtype if self.pipeline.takes_audio else torch.long
        self._buf = torch.zeros(batch_size, self.chunk, dtype=self._in_dtype, device=codec.device)
        self._fill = 0
        self._graph = None
        if graphs_enabled(codec.device, cuda_graphs):
            r = GraphRunner(lambda x, idx: self.pipeline.step(x, None), [((self.chunk,), self._in_dtype)], [batch_size],
                            codec.device, 0, use_graphs=True, tune_for=codec.dtype)
            if r.capture():  # warm-up and capture stepped the state for real: start over
                self._graph = r
                self.reset()

    @property
    def states(self) -> dict:
        """Stage name -> its streaming state (slot axis first)."""
        return self.pipeline.states

    @property
    def pending(self) -> int:
        """Samples (audio in) or tokens (decoder) buffered towards the next step."""
        return self._fill

    @property
    def state_bytes(self) -> int:
        return self.pipeline.nbytes + self._buf.numel() * self._buf.element_size()

    # ------------------------------------------------------------------ input
    def _check(self, x) -> Tensor:
        """Validated (batch, n) input on the device; raises before anything is touched."""
        name = "audio" if self.pipeline.takes_audio else "tokens"
        x = as_tensor(x, name)
        if x.dim() == 1 and self.batch_size == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2 or x.shape[0] != self.batch_size:
            raise InputError(f"expected shape ({self.batch_size}, n), got {tuple(x.shape)}")
        if x.shape[1] == 0:
            return x
        if self.pipeline.takes_audio:
            return check_audio(x, name=name)[0].to(self.codec.device, self.codec.dtype)
        return check_tokens(x, self.codec.codebook_size, name)[0].to(self.codec.device)

    def _buffer(self, x: Tensor) -> Tensor | None:
        """Append x (batch, n) to the partial-chunk buffer; return the buffered chunk and every
        whole chunk after it, joined (None while the chunk is incomplete)."""
        unit = self.chunk
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

    # ------------------------------------------------------------------ running
    def _empty(self) -> dict[str, Tensor]:
        dev = self.codec.device
        return {"toks": torch.zeros(self.batch_size, 0, dtype=torch.long, device=dev),
                "audio": torch.zeros(self.batch_size, 0, dtype=torch.float32, device=dev)}

    def _result(self, out: dict[str, Tensor]):
        check_err(out["err"], "audio" if self.pipeline.takes_audio else "tokens", self.codec.dtype)
        res = tuple(out[k].float() if k == "audio" else out[k] for k in self.outputs)
        return res[0] if len(res) == 1 else res

    def push(self, x):
        """Append samples or tokens (batch, n) for every stream; return what is now complete."""
        with torch.inference_mode():
            x = self._check(x)
            whole = self._buffer(x) if x.shape[1] else None
            if whole is None:
                return self._result({**self._empty(), "err": torch.zeros(1, dtype=torch.int32)})
            if self._graph is not None:
                outs = [[o.clone() for o in self._graph.run(self.batch_size, [whole[:, a:a + self.chunk]])]
                        for a in range(0, whole.shape[1], self.chunk)]
                joined = [torch.cat(o, 1) if o[0].dim() > 1 else torch.stack(o).amax(0) for o in zip(*outs)]
                out = dict(zip((*self.outputs, "err"), joined))
            else:
                out = self.pipeline.run_segmented(whole, self.idx, self.outputs, self.codec.segment_frames)
            return self._result(out)

    def flush(self, offline_tail: bool = False):
        """End the streams: zero-pad a partial chunk of audio (one token per started 20 ms
        frame) or decode a partial group of tokens (as offline decoding does), then reset.
        offline_tail: run a partial chunk at its own length (whole 20 ms frames) instead, as
        offline encoding of the whole signal does: pushes + flush(offline_tail=True) then give
        sig_to_toks's tokens (the frames of a zero-padded chunk also see its padding)."""
        if not isinstance(offline_tail, (bool, np.bool_)):  # "no" or 0.0 would read as a choice
            raise InputError(f"offline_tail must be True or False, got {offline_tail!r:.40}")
        with torch.inference_mode():
            if self._fill == 0:
                out = {**self._empty(), "err": torch.zeros(1, dtype=torch.int32)}
            else:
                out = self.pipeline.run_tail(self._buf[:, :self._fill], self.idx, self.outputs,
                                             self.codec.segment_frames, offline_tail)
            self.reset()
            return self._result(out)

    def reset(self, rows=None) -> None:
        """Start new streams in `rows` (all when None). Rows can only be reset at a chunk
        boundary, since the streams of a session share one input clock."""
        if rows is None:
            r = None
        else:
            try:  # as given: dtype=long would truncate 0.5 or 1.9 to a row index and reset that row
                r = torch.as_tensor(rows).reshape(-1)
            except (TypeError, ValueError, RuntimeError):
                raise InputError(f"rows must be integer row indices, got {rows!r:.80}") from None
            if r.numel() and (r.is_floating_point() or r.is_complex() or r.dtype == torch.bool):  # [] is float
                raise InputError(f"rows must be integer row indices, got {r.dtype} {rows!r:.80}")
            r = r.long()
            if r.numel() and (int(r.min()) < 0 or int(r.max()) >= self.batch_size):
                raise InputError(f"rows must be in [0, {self.batch_size}), got {r.tolist()}")
            if self._fill:
                raise InputError(
                    f"reset(rows) with {self._fill} {'samples' if self.pipeline.takes_audio else 'tokens'} pending: "
                    "reset rows at a chunk boundary (push whole chunks), or use StreamEngine for streams with "
                    "their own clocks")
            r = r.to(self.codec.device)
        self.pipeline.reset(r)
        if rows is None:
            self._buf.zero_()
            self._fill = 0


class StreamEncoder(_Session):
    """16 kHz audio in, tokens out (4 per 1280-sample chunk)."""

    mode = "encode"


class StreamDecoder(_Session):
    """Tokens in (4 per step), 24 kHz float32 audio out (1920 samples per step)."""

    mode = "decode"


class Stream(_Session):
    """Audio in, tokens and audio out: the full pipeline per chunk (one CUDA graph on GPU).
    push and flush return (tokens, audio)."""

    mode = "full"
