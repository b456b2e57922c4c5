"""ONNX export of the streaming step, and a runner that streams through ONNX Runtime.

The exported graph is the pipeline's chunk step (`Pipeline.step`) as a pure function:

    inputs:  x (B, 1280) float audio, or (B, 4) int64 tokens in mode "decode";
             then every state tensor of the mode (fixed shapes, slot axis = batch)
    outputs: the step outputs (full: toks, audio, err; encode: toks, err; decode: audio, err);
             then the new state tensors, in the same order as the inputs

State names are `<stage>.<field>[.<i>[.<j>]]` (e.g. `encoder.k_ring.3`, `compressor.pos`).
`pos` is an input like the rest, so a fresh state (all zeros, pos = 0) takes the same first-
chunk path (causal pads replicate the first frame) as fastfocal's own sessions: tokens agree
from the first chunk. Needs the `onnx` extra (onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .inputs import InputError, amplitude_problem, stream_batch
from .pipeline import MODE_OUTPUTS, Pipeline, run_stages
from .state import StageState

OPSET = 18  # onnxruntime runs it; the dynamo exporter's lowest well-tested opset


def _names(prefix: str, v) -> list[str]:
    if isinstance(v, Tensor):
        return [prefix]
    if isinstance(v, list):
        return [n for i, x in enumerate(v) for n in _names(f"{prefix}.{i}", x)]
    return []


def state_names(states: dict[str, StageState]) -> list[str]:
    """One name per tensor, in `StageState.tensors()` order, stage by stage."""
    return [n for s, st in states.items() for f in dataclasses.fields(st) for n in _names(f"{s}.{f.name}", getattr(st, f.name))]


def _rebuild(template, it):
    """Same nesting as template, tensors taken in order from the iterator `it`."""
    if isinstance(template, Tensor):
        return next(it)
    if isinstance(template, list):
        return [_rebuild(x, it) for x in template]
    return template


def _with_tensors(st: StageState, it) -> StageState:
    return type(st)(**{f.name: _rebuild(getattr(st, f.name), it) for f in dataclasses.fields(st)})


class StepFunction(nn.Module):
    """(x, *state) -> (*step outputs, *new state): the pipeline step without side effects."""

    def __init__(self, model, mode: str = "full", batch: int = 1):
        super().__init__()
        self.model, self.mode, self.batch = model, mode, batch
        self.template = Pipeline(model, mode, batch, device="cpu").states  # shapes and nesting only

    def forward(self, x: Tensor, *flat: Tensor):
        it = iter([t.clone() for t in flat])  # the step updates its state in place: work on copies
        states = {k: _with_tensors(st, it) for k, st in self.template.items()}
        idx = torch.arange(x.shape[0], device=x.device)
        out = run_stages(self.model, tuple(self.template), x, states, idx)
        new = [t for st in states.values() for t in st.tensors()]
        return (*(out[k] for k in MODE_OUTPUTS[self.mode]), out["err"], *new)


def example_inputs(codec, mode: str, batch: int) -> tuple[Tensor, ...]:
    """A chunk of the right kind and a fresh state, on the codec's device and dtype."""
    pipe = Pipeline(codec.model, mode, batch)
    if pipe.takes_audio:
        x = 0.1 * torch.randn(batch, pipe.chunk, generator=torch.Generator().manual_seed(0)).to(codec.device, codec.dtype)
    else:
        x = torch.randint(0, codec.codebook_size, (batch, pipe.chunk), generator=torch.Generator().manual_seed(0)).to(codec.device)
    # clones: the rings are views of one buffer per stage, and exported inputs must not alias
    return (x, *(t.clone() for st in pipe.states.values() for t in st.tensors()))


def export(codec, path, mode: str = "full", batch: int = 1, opset: int = OPSET, optimize: bool = True) -> Path:
    """Write the streaming step of `codec` in `mode` for `batch` streams to `path` (.onnx).

    Uses the dynamo exporter: it functionalises the in-place state updates (index_copy_, the
    K/V ring writes), which the TorchScript exporter cannot export (advanced-index index_put).
    The graph is the torch reference path, the exact fp32 computation. optimize: onnxscript's
    graph optimiser (constant folding, fusions) on export; it doubles the export time."""
    import onnx  # noqa: F401  (fail early and clearly without the extra)
    import onnxscript  # noqa: F401

    if not codec.causal:
        raise ValueError(f"ONNX export is of the streaming step: {codec.name} is non-causal")
    if mode not in MODE_OUTPUTS:
        raise ValueError(f"mode must be one of {tuple(MODE_OUTPUTS)}, got {mode!r}")
    if codec.device.type != "cpu":
        raise ValueError("export from a CPU codec (the graph is the torch reference path)")
    if codec.dtype != torch.float32:  # ONNX Runtime's CPU kernels have no bfloat16 Sin, among others
        raise ValueError(f"export a float32 codec (got {str(codec.dtype).removeprefix('torch.')}): "
                         "the graph is the exact float32 step")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fn = StepFunction(codec.model, mode, batch).eval()
    names = state_names(fn.template)
    with torch.no_grad():
        torch.onnx.export(fn, example_inputs(codec, mode, batch), str(path), input_names=["x", *names],
                          output_names=[*MODE_OUTPUTS[mode], "err", *(f"new.{n}" for n in names)],
                          opset_version=opset, dynamo=True, external_data=False, optimize=optimize, verbose=False)
    import onnx

    m = onnx.load(str(path))  # what OnnxStream checks tokens against
    onnx.helper.set_model_props(m, {"fastfocal.codebook_size": str(codec.codebook_size), "fastfocal.mode": mode})
    onnx.save(m, str(path))
    return path


class OnnxStream:
    """Streams through an exported step with ONNX Runtime; state kept as numpy arrays.

    The state starts fresh exactly as a fastfocal session's does (zeros, pos = 0). `push`
    takes any number of samples (tokens for a decode model) per stream and returns what whole
    chunks gave: (toks, audio) / toks / audio as numpy, like `codec.stream()`, or None before
    a whole chunk. Input is checked before anything runs (shape, dtype, NaN/Inf and ±8 for
    audio, the codebook for tokens), and the state and buffer change only when every chunk ran
    without an error code: a refused push leaves the streams as they were. `flush` ends the
    streams through the same whole-chunk step (see there)."""

    def __init__(self, path, threads: int | None = None, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=list(providers))
        ins = self.session.get_inputs()
        self.x_info, self.state_info = ins[0], ins[1:]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.n_step = len(self.outputs) - len(self.state_info)
        self.batch, self.chunk = self.x_info.shape
        self.x_dtype = _np_dtype(self.x_info.type)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.codebook_size = int(meta["fastfocal.codebook_size"]) if "fastfocal.codebook_size" in meta else None
        self.reset()

    def reset(self) -> None:
        """New streams: a fresh state (what `StageState.zeros` allocates)."""
        self.state = [np.zeros(i.shape, _np_dtype(i.type)) for i in self.state_info]
        self._buf = np.zeros((self.batch, 0), self.x_dtype)

    def step(self, x: np.ndarray, state: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One chunk (B, chunk) from `state` (default the stream's): (step outputs (..., err),
        the new state). Nothing is stored: `push` keeps the state once every chunk is good."""
        feed = {self.x_info.name: np.ascontiguousarray(x, self.x_dtype)}
        feed.update({i.name: s for i, s in zip(self.state_info, self.state if state is None else state)})
        res = self.session.run(self.outputs, feed)
        return res[:self.n_step], res[self.n_step:]

    def _check(self, x) -> np.ndarray:
        """x as (batch, n) in the graph's input dtype, or an InputError naming the problem."""
        tokens = self.x_dtype != np.float32
        if not isinstance(x, np.ndarray) and not hasattr(x, "detach"):
            x = np.asarray(x)
        if x.ndim == 1 and self.batch == 1:
            x = x[None]
        # the engine's checks of a batch of stream pieces: shape, dtype, the codebook (a graph
        # exported before it was stored: any non-negative int64)
        x = stream_batch(x, self.batch, "tokens" if tokens else "audio",
                         (self.codebook_size or 1 << 63) if tokens else None)
        if tokens:
            return x
        for r in range(x.shape[0]):  # values too: a push's chunks run before their error codes are seen
            problem = amplitude_problem(x[r])
            if problem is not None:
                raise InputError(f"audio {problem} (row {r})")
        return x

    def _run(self, buf: np.ndarray):
        """Every whole chunk of buf from the stream's state: (outputs per chunk, new state), or
        a ValueError (and nothing kept) if any chunk gave an error code."""
        outs, state = [], self.state
        for i in range(buf.shape[1] // self.chunk):
            o, state = self.step(buf[:, i * self.chunk:(i + 1) * self.chunk], state)
            outs.append(o)
        if outs:
            bad = np.max([o[-1] for o in outs], 0)
            if bad.any():  # valid input, non-finite output: nothing is kept
                raise ValueError(f"non-finite output in rows {np.nonzero(bad)[0].tolist()} (codes {bad.tolist()}); "
                                 "the streams are as before this call")
        return outs, state

    def _join(self, outs):
        res = tuple(np.concatenate([o[j] for o in outs], 1) for j in range(self.n_step - 1))  # err last
        return res[0] if len(res) == 1 else res

    def push(self, x):
        x = self._check(x)
        buf = np.concatenate([self._buf, x], 1)
        outs, state = self._run(buf)
        self.state, self._buf = state, buf[:, len(outs) * self.chunk:]
        return self._join(outs) if outs else None

    def flush(self):
        """End the streams and start fresh ones, through the same whole-chunk step: the partial
        chunk left is padded to a whole chunk, run, and what it gave is cut to the input. Audio
        is padded with zeros: one token per started 20 ms frame, the tokens
        `codec.stream().flush()` gives, and (full graph) the audio fastfocal's stream gives
        for the zero-padded chunk. Tokens (decode graph) are padded by repeating the last one.
        Either way a partial token group is decoded as part of a padded group, which its audio
        depends on: fastfocal's own flush decodes the group at its own length, as offline
        decoding does, and the last < 60 ms differ (by ~4% RMS on the tiny model). Empty
        outputs when nothing is pending."""
        n = self._buf.shape[1]
        audio_in = self.x_dtype == np.float32
        if audio_in or n == 0:
            buf = np.zeros((self.batch, self.chunk), self.x_dtype)
        else:
            buf = np.repeat(self._buf[:, -1:], self.chunk, 1)
        buf[:, :n] = self._buf
        outs, _ = self._run(buf)
        res = outs[0][:-1]  # err last
        if audio_in:  # tokens, and in a full graph their audio
            keep = -(-n * res[0].shape[1] // self.chunk)
            per_tok = res[-1].shape[1] // res[0].shape[1]
            res = [res[0][:, :keep]] + ([res[1][:, :keep * per_tok]] if len(res) == 2 else [])
        else:
            res = [res[0][:, :n * (res[0].shape[1] // self.chunk)]]
        self.reset()
        return res[0] if len(res) == 1 else tuple(res)


def _np_dtype(onnx_type: str):
    return {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
            "tensor(float16)": np.float16, "tensor(double)": np.float64}[onnx_type]
