"""The pipeline: the stage order and the one step every front end drives.

    encoder (WavLM) -> compressor + quantizer (FocalEncoder, BSQ) -> decompressor -> decoder

A `Pipeline` holds the slot-indexed streaming state of a run of consecutive stages (a mode:
"full", "encode", "decode", or any run such as ("encoder",)) and runs them over the rows
`idx` of that state. Offline causal inference, the streaming sessions, the many-stream engine
(and a stream's final flush), the corpus encoder and the server all call it; nothing else
spells out the stage order. Non-causal models have no state: `run_offline` runs each module
once over the whole input.

No host syncs happen inside `run`/`step`: bad rows come back as an error code per row
(`ERRORS`), checked by the caller once per call.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops
from .inputs import MAX_AMPLITUDE, InputError
from .kernels.status import ERR_NONFINITE_INPUT, ERR_NONFINITE_OUTPUT, ERR_OUT_OF_RANGE
from .model import FocalCodecModel
from .state import StageState, all_rows

STAGES = ("encoder", "compressor", "decompressor", "decoder")
MODES = {"full": STAGES, "encode": STAGES[:2], "decode": STAGES[2:]}
# what each stage hands on (the compressor also gives "lats"; the quantizer's tokens feed the decompressor)
PRODUCES = {"encoder": "feats", "compressor": "toks", "decompressor": "qfeats", "decoder": "audio"}
MODE_OUTPUTS = {"full": ("toks", "audio"), "encode": ("toks",), "decode": ("audio",)}
ERRORS = {ERR_NONFINITE_INPUT: "non-finite input", ERR_OUT_OF_RANGE: "input out of range",
          ERR_NONFINITE_OUTPUT: "non-finite output"}
SEGMENT_FRAMES = 2048  # frames per offline segment (~41 s): bounds activation memory


class NumericsError(ArithmeticError):
    """The model produced NaN/Inf from valid input (overflow in reduced precision, bad weights)."""


def stages_for(mode: str | Sequence[str]) -> tuple[str, ...]:
    """The stages of a mode, or a run of consecutive stage names checked as such."""
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        return MODES[mode]
    st = tuple(mode)
    i = STAGES.index(st[0]) if st and st[0] in STAGES else -1
    if i < 0 or STAGES[i:i + len(st)] != st:
        raise ValueError(f"stages must be consecutive names from {STAGES}, got {st}")
    return st


def stage_dtype(model: FocalCodecModel, stage: str) -> torch.dtype:
    """The dtype a stage computes in: its weights' (a mixed-precision codec keeps the
    compressor, whose output signs are the tokens, wider than the rest)."""
    return next(getattr(model, stage).parameters()).dtype


def run_stages(model: FocalCodecModel, stages: Sequence[str], x: Tensor, states: dict | None = None,
               idx: Tensor | None = None) -> dict[str, Tensor]:
    """Each stage's product ("feats", "lats", "toks", "qfeats", "audio") and "err" (B,), for
    stages over x: streaming over rows idx of `states`, or stateless (non-causal, whole input)."""
    out: dict[str, Tensor] = {}
    first = x
    # on the Triton path the stages' frame counts advance in the status launch at the end
    with ops.deferred_advances(states is not None and ops.use_triton(x)) as advances:
        for name in stages:
            st = states[name] if states is not None else None
            dt = stage_dtype(model, name)
            if x.is_floating_point() and x.dtype != dt:  # mixed precision: each stage in its own dtype
                x = x.to(dt)
            if name == "compressor":  # normalise + quantize in one pass; tokens feed the decompressor
                out["lats"], x, _ = model.compressor(x, st, idx, quantize=True)
            else:
                x = getattr(model, name)(x, st, idx)
            out[PRODUCES[name]] = x
    # checked: the signs' source and what is handed out
    checked = [out[k] for k in dict.fromkeys(("lats", PRODUCES[stages[-1]])) if k in out and out[k].is_floating_point()]
    out["err"] = ops.row_status(first if stages[0] == "encoder" else None, checked, MAX_AMPLITUDE, first.shape[0],
                                advances)
    return out


class Pipeline:
    """Streaming state for `slots` rows of a run of stages, and the step over them.

    mode: "full" (audio -> tokens + audio), "encode" (audio -> tokens), "decode" (tokens ->
    audio), or a run of stage names. States are allocated once; `reset(slots)` clears rows.
    """

    def __init__(self, model: FocalCodecModel, mode: str | Sequence[str] = "full", slots: int = 1,
                 device=None, dtype=None):
        self.model, self.cfg = model, model.cfg
        self.mode = mode if isinstance(mode, str) else None
        self.stages = stages_for(mode)
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype or p.dtype
        self.slots = slots
        self.states: dict[str, StageState] = {  # each stage's state in that stage's dtype
            s: getattr(model, s).init_state(slots, self.device, dtype or stage_dtype(model, s)) for s in self.stages
        }
        self._view_cache: dict[tuple[int, int], dict[str, StageState]] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def takes_audio(self) -> bool:
        return self.stages[0] == "encoder"

    @property
    def unit(self) -> int:
        """Input elements per frame: samples for audio input, else one frame."""
        return self.cfg.hop_samples if self.takes_audio else 1

    @property
    def chunk(self) -> int:
        """Input elements per streaming step (1280 samples or 4 tokens)."""
        return self.cfg.chunk_frames * self.unit

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states.values())

    @staticmethod
    def bytes_per_slot(model: FocalCodecModel, mode: str | Sequence[str] = "full", dtype=None) -> int:
        """State bytes of one slot, computed on the meta device (nothing allocated); dtype
        defaults to each stage's own."""
        return sum(getattr(model, s).init_state(1, "meta", dtype or stage_dtype(model, s)).nbytes
                   for s in stages_for(mode))

    @staticmethod
    def activation_bytes_for(cfg, dtype, rows: int, frames: int) -> int:
        """A generous bound on the live activations of a run over `frames` frames of `rows` rows
        (segments cap the frames; the widest layer sets the width)."""
        width = max(cfg.encoder.ffn_dim, cfg.encoder.dim, cfg.decoder.ffn_dim, cfg.decoder.dim)
        return rows * min(frames, SEGMENT_FRAMES) * 8 * width * torch.finfo(dtype).bits // 8

    def reset(self, slots: Tensor | list[int] | None = None) -> None:
        for s in self.states.values():
            s.reset(slots)

    # ------------------------------------------------------------------ running
    def run(self, x: Tensor, idx: Tensor | None, stages: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Run `stages` (default: all of this pipeline's) once over x for slots idx (None: every
        slot in order, x one row per slot).

        x: audio (B, N) with N a whole number of chunks (a stream's last call may be shorter:
        see run_tail), or the first stage's input (features, tokens or codes, qfeats). Returns
        each stage's product ("feats", "lats", "toks", "qfeats", "audio") and "err" (B,).
        """
        if idx is None and x.shape[0] != self.slots:  # None = every slot: one row each, or state copies would broadcast
            raise ValueError(f"idx None runs every one of the {self.slots} slots, got {x.shape[0]} rows")
        span = self._span(idx)
        if span is not None:  # a range of slots: their state rows as views, used in place
            return run_stages(self.model, stages or self.stages, x, self._views(*span), None)
        return run_stages(self.model, stages or self.stages, x, self.states, idx)

    def _span(self, idx: Tensor | None) -> tuple[int, int] | None:
        """(lo, hi) when idx is slots lo..hi-1 in order, checked on CPU only (no device sync).
        On CPU every module gathers and scatters the state rows of an index (the whole K/V and
        focal rings: at 8 streams ~200 MB moved a full step); a range is read in place."""
        if idx is None or idx.device.type != "cpu" or idx.dim() != 1 or not idx.numel():
            return None
        lo = int(idx[0])
        hi = lo + idx.numel()
        if lo < 0 or hi > self.slots:
            return None
        return (lo, hi) if torch.equal(idx, all_rows(None, self.slots, "cpu")[lo:hi]) else None

    def _views(self, lo: int, hi: int) -> dict[str, StageState]:
        key = (lo, hi)
        v = self._view_cache.get(key)
        if v is None:
            if len(self._view_cache) >= 64:  # streams come and go: keep the recent ranges only
                self._view_cache.clear()
            v = self._view_cache[key] = self.states if (lo, hi) == (0, self.slots) else \
                {s: st.rows(lo, hi) for s, st in self.states.items()}
        return v

    def step(self, x: Tensor, idx: Tensor | None) -> tuple[Tensor, ...]:
        """One chunk for rows idx, as static tensors (what a CUDA graph captures):
        full -> (toks, audio, err), encode -> (toks, err), decode -> (audio, err)."""
        out = self.run(x, idx)
        return tuple(out[k] for k in MODE_OUTPUTS[self.mode]) + (out["err"],)

    def run_segmented(self, x: Tensor, idx: Tensor | None, keep: Sequence[str], segment_frames: int = SEGMENT_FRAMES,
                      stages: Sequence[str] | None = None) -> dict[str, Tensor]:
        """`run` over time segments of `segment_frames` frames (memory bounded whatever the
        length); the kept outputs are joined along time, "err" is the worst per row."""
        stages = tuple(stages or self.stages)
        keep = list(dict.fromkeys(keep))
        unit = self.cfg.hop_samples if stages[0] == "encoder" else 1
        step = max(1, segment_frames // self.cfg.chunk_frames) * self.cfg.chunk_frames * unit
        parts: dict[str, list[Tensor]] = {k: [] for k in keep}
        err = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        for a in range(0, x.shape[1], step):
            o = self.run(x[:, a:a + step], idx, stages)
            for k in keep:
                parts[k].append(o[k])
            err = torch.maximum(err, o["err"])
        res = {k: v[0] if len(v) == 1 else torch.cat(v, 1) for k, v in parts.items()}
        res["err"] = err
        return res

    def run_tail(self, x: Tensor, idx: Tensor | None, keep: Sequence[str],
                 segment_frames: int = SEGMENT_FRAMES, offline_tail: bool = False) -> dict[str, Tensor]:
        """A stream's end: all of x (B, n) for any n. Audio is zero-padded to whole chunks (the
        streaming rule; offline_tail: only to whole frames, so a partial last chunk is run at its
        own length as offline encoding of the whole signal runs it) and gives one token per
        started frame; a partial token group is decoded as offline does."""
        n = x.shape[1]
        enc = tuple(s for s in self.stages if s in MODES["encode"])
        dec = tuple(s for s in self.stages if s in MODES["decode"])
        out: dict[str, Tensor] = {}
        err = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        if enc:
            frames = -(-n // self.cfg.hop_samples)
            unit = 1 if offline_tail else self.cfg.chunk_frames
            padded = x.new_zeros(x.shape[0], -(-frames // unit) * unit * self.cfg.hop_samples)
            padded[:, :n] = x
            o = self.run_segmented(padded, idx, [k for k in keep if k != "audio"] + ["toks"], segment_frames, enc)
            out = {k: v[:, :frames] for k, v in o.items() if k != "err"}  # zero padding adds no error
            err = o["err"]
            x = out["toks"]
        if dec:
            o = self.run_segmented(x, idx, [k for k in keep if k in ("qfeats", "audio")], segment_frames, dec)
            out.update({k: v for k, v in o.items() if k != "err"})
            err = torch.maximum(err, o["err"])
        out["err"] = err
        return {k: out[k] for k in (*keep, "err")}


def check_err(err: Tensor, name: str = "input", dtype: torch.dtype | None = None) -> None:
    """Raise for the worst bad row of a run: InputError for bad audio, NumericsError otherwise."""
    if not bool(err.any()):
        return
    rows = err.nonzero().flatten().tolist()
    where = f" (row{'s' if len(rows) > 1 else ''} {rows[:8]})" if err.numel() > 1 else ""
    code = int(err.max())
    if code == 1:
        raise InputError(f"{name} contains NaN or Inf{where}")
    if code == 2:
        raise InputError(f"{name} has samples beyond ±{MAX_AMPLITUDE:g}{where}")
    if dtype == torch.float32:  # no precision to blame: the input's values or the weights
        raise NumericsError(f"the model produced NaN/Inf from {name}{where} in float32: the input's values are "
                            "out of the model's range or the weights are broken")
    raise NumericsError(f"the model produced NaN/Inf from {name}{where}: reduced precision overflowed "
                        "or the weights are broken; try float32")


def run_offline(model: FocalCodecModel, stages: Sequence[str], x: Tensor, keep: Sequence[str],
                segment_frames: int = SEGMENT_FRAMES) -> dict[str, Tensor]:
    """The given stages over a whole input x (B, N) audio or (B, T[, C]) frames.

    Causal: the streaming computation over long segments with a fresh state, so offline
    equals streaming by construction and memory is O(segment), not O(length).
    Non-causal: each module once over the whole input (attention sees all of it).
    """
    stages = stages_for(stages)
    if model.cfg.causal:
        pipe = Pipeline(model, stages, x.shape[0], device=x.device)
        return pipe.run_segmented(x, None, keep, segment_frames)  # idx None: every row in order
    out = run_stages(model, stages, x)
    return {k: out[k] for k in (*keep, "err")}
