"""The user-facing Codec: offline API with the upstream method names, and streaming sessions.

Every method checks its input (fastfocal.inputs) and runs stages of the one pipeline
(fastfocal.pipeline); audio returned to users is float32 whatever the compute dtype, while
features, latents and codes keep the compute dtype.
"""
from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from . import ops
from .config import CodecConfig
from .inputs import (MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, InputError, available_bytes, check_amplitude, check_audio,
                     check_fits, check_frames, check_tokens, check_view)
from .model import FocalCodecModel, num_params
from .pipeline import ERR_NONFINITE_OUTPUT, SEGMENT_FRAMES, Pipeline, check_err, run_offline

if TYPE_CHECKING:
    from .streaming import Stream, StreamDecoder, StreamEncoder

SAMPLE_RATE_INPUT = 16000
log = logging.getLogger("fastfocal")


class Codec:
    """A loaded FocalCodec model. Build with `fastfocal.load(...)` or `fastfocal.random_init(...)`.

    Causal models run offline as long streaming segments over a fresh state: memory is
    O(segment · window) whatever the input length, and offline equals streaming exactly.
    """

    segment_frames = SEGMENT_FRAMES  # frames per offline segment (~41 s): bounds activation memory

    def __init__(self, model: FocalCodecModel, name: str = "custom"):
        self.model = model
        self.config: CodecConfig = model.cfg
        self.name = name
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.fp32_rows = 0  # rows that overflowed in float16 and were recomputed in float32
        self._wide: FocalCodecModel | None = None
        self._wide_lock = threading.Lock()

    # ------------------------------------------------------------------ properties
    @property
    def sample_rate_input(self) -> int:
        return SAMPLE_RATE_INPUT

    @property
    def sample_rate_output(self) -> int:
        return self.config.sample_rate_output

    @property
    def causal(self) -> bool:
        return self.config.causal

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def code_dim(self) -> int:
        return self.config.code_dim

    @property
    def chunk_size(self) -> int:
        """Input samples per streaming step (1280 = 80 ms for the 50 Hz causal models)."""
        return self.config.chunk_frames * self.config.hop_samples

    @property
    def token_rate(self) -> float:
        return self.sample_rate_input / self.config.token_hop

    @property
    def latency(self) -> float | None:
        """Theoretical algorithmic latency in ms (chunk duration); None for non-causal models."""
        return 1000.0 * self.chunk_size / self.sample_rate_input if self.causal else None

    @property
    def num_params(self) -> int:
        return num_params(self.model)

    def __repr__(self) -> str:
        return (
            f"Codec({self.name!r}, causal={self.causal}, codebook={self.codebook_size}, "
            f"params={self.num_params / 1e6:.1f}M, device={self.device}, dtype={self.dtype})"
        )

    @property
    def weights_hash(self) -> str | None:
        """sha256 of the checkpoint's tensors as loaded (same for every compute dtype)."""
        return getattr(self.model, "weights_hash", None)

    # ------------------------------------------------------------------ input checks
    def _sig(self, sig) -> tuple[Tensor, bool]:
        # values (NaN/Inf, range) are checked by _run once the batch is known to fit
        sig, squeeze = check_audio(sig, frame=self.config.hop_samples, finite=False)
        if sig.dtype != self.dtype or sig.device != self.device:
            check_view(sig, "audio")  # the conversion copies it, before _run's memory check
        return sig.to(self.device, self.dtype), squeeze

    def _toks(self, toks) -> tuple[Tensor, bool]:
        toks, squeeze = check_tokens(toks, self.codebook_size)
        return toks.to(self.device), squeeze

    def _frames(self, x, dim: int, what: str) -> tuple[Tensor, bool]:
        x, squeeze = check_frames(x, dim, what)
        return x.to(self.device, self.dtype), squeeze

    # ------------------------------------------------------------------ running
    def _run(self, stages: Sequence[str], x: Tensor, squeeze: bool, keep: str, name: str, wide: bool = False) -> Tensor:
        """The pipeline's stages over a whole checked input; one output, float32 if audio.
        wide: on the float32 weights (x's values as they are: float16 values are exact in float32)."""
        dtype = torch.float32 if wide else self.dtype
        check_fits(x.shape[0] * self._row_bytes(stages, x, dtype, keep), self.device,
                   f"a batch of {x.shape[0]} x {x.shape[1]} {name}", "use a smaller batch or split the input")
        if stages[0] == "encoder":
            check_amplitude(x, name)
        with torch.inference_mode():
            model = self.float32_model() if wide else self.model
            out = run_offline(model, stages, x.float() if wide else x, [keep], self.segment_frames)
            if keep == "audio":
                out["audio"] = out["audio"].float()
            if self.dtype == torch.float16 and not wide:
                self._redo_overflowed(stages, x, out, keep, name)
        check_err(out["err"], name, torch.float32 if wide else self.dtype)
        return out[keep][0] if squeeze else out[keep]

    def _row_bytes(self, stages: Sequence[str], x: Tensor, dtype: torch.dtype, keep: str) -> int:
        """Memory one row of x takes through `stages` in `dtype`: streaming state (causal), an
        activation bound, and the `keep` output, which is held whole."""
        frames = x.shape[1] // (self.config.hop_samples if stages[0] == "encoder" else 1)
        state = Pipeline.bytes_per_slot(self.model, stages, dtype) if self.causal else 0
        act = Pipeline.activation_bytes_for(self.config, dtype, 1, frames)
        return state + act + self._out_bytes(stages, x, dtype, keep)

    def _out_bytes(self, stages: Sequence[str], x: Tensor, dtype: torch.dtype, keep: str) -> int:
        """One row's `keep` output: its segments and their concatenation in `dtype` (int64 tokens),
        and audio's float32 copy. Tokens at 50 Hz give 480 samples each at 24 kHz."""
        c = self.config
        n = -(-x.shape[1] // c.hop_samples) if stages[0] == "encoder" else x.shape[1]  # frames in
        if "compressor" in stages:
            n = -(-n // math.prod(c.compressor.downscale_factors))
        if "decompressor" in stages:
            n *= math.prod(c.decompressor.upscale_factors)
        size = torch.finfo(dtype).bits // 8
        per_frame = {"feats": c.encoder.dim * 2 * size, "lats": c.code_dim * 2 * size, "toks": 2 * 8,
                     "qfeats": c.decompressor.output_dim * 2 * size,
                     "audio": c.decoder.hop_length * (2 * size + (4 if dtype != torch.float32 else 0))}
        return n * per_frame[keep]

    def _redo_overflowed(self, stages: Sequence[str], x: Tensor, out: dict, keep: str, name: str) -> None:
        """float16 has 5 exponent bits, so a loud input can overflow where bfloat16 and float32
        cannot. Rows whose float16 run gave NaN/Inf are run again in float32 on the same
        weights (float16 values are exact in float32), in place in `out`; other rows keep
        their float16 results. A value that fits float32 but not a float16 output stays an error."""
        bad = (out["err"] == ERR_NONFINITE_OUTPUT).nonzero().flatten()  # one sync, as check_err's
        if not bad.numel():
            return
        wide = self.float32_model()
        step = max(1, available_bytes(self.device) // self._row_bytes(stages, x, torch.float32, keep))  # twice fp16's
        y = out[keep]
        for a in range(0, bad.numel(), step):
            rows = bad[a:a + step]
            o = run_offline(wide, stages, x[rows].float(), [keep], self.segment_frames)
            y[rows] = o[keep].to(y.dtype)
            err = o["err"]
            if y.is_floating_point():
                err = torch.where(torch.isfinite(y[rows]).flatten(1).all(1), err, ERR_NONFINITE_OUTPUT)
            out["err"][rows] = err.to(out["err"].dtype)
        self.fp32_rows += bad.numel()
        rows = bad.tolist()
        log.warning("float16 overflowed on %s%s; recomputed in float32", name,
                    f" (rows {rows[:8]})" if x.shape[0] > 1 else "")

    def float32_model(self) -> FocalCodecModel:
        """This codec's weights in float32 (the model itself for a float32 codec; for a reduced-
        precision one a copy, built once, on first use: it holds 4 bytes per parameter)."""
        if self.dtype == torch.float32:
            return self.model
        with self._wide_lock:
            if self._wide is None:
                n = sum(p.numel() for p in self.model.parameters())
                check_fits(n * (4 + torch.finfo(self.dtype).bits // 8), self.device,  # the copy, then its float32 form
                           "a float32 copy of the weights (to recompute rows that overflowed in float16)")
                self._wide = copy.deepcopy(self.model).float()
            return self._wide

    # ------------------------------------------------------------------ offline API
    def sig_to_feats(self, sig) -> Tensor:
        return self._run(("encoder",), *self._sig(sig), keep="feats", name="audio")

    def feats_to_lats(self, feats) -> Tensor:
        x, sq = self._frames(feats, self.config.encoder.dim, "features")
        return self._run(("compressor",), x, sq, "lats", "features")

    def lats_to_toks(self, lats) -> Tensor:
        lats, sq = self._frames(lats, self.code_dim, "latents")
        toks = ops.bsq_quantize(lats)[0]
        return toks[0] if sq else toks

    def lats_to_codes(self, lats) -> Tensor:
        lats, sq = self._frames(lats, self.code_dim, "latents")
        codes = ops.bsq_quantize(lats)[1]
        return codes[0] if sq else codes

    def toks_to_codes(self, toks) -> Tensor:
        toks, sq = self._toks(toks)
        codes = ops.bsq_codes(toks, self.code_dim, self.dtype)
        return codes[0] if sq else codes

    def codes_to_toks(self, codes) -> Tensor:
        return self.lats_to_toks(codes)

    def codes_to_qfeats(self, codes) -> Tensor:
        x, sq = self._frames(codes, self.code_dim, "codes")
        return self._run(("decompressor",), x, sq, "qfeats", "codes")

    def toks_to_qfeats(self, toks) -> Tensor:
        return self._run(("decompressor",), *self._toks(toks), keep="qfeats", name="tokens")

    def feats_to_sig(self, feats) -> Tensor:
        """Decoder alone: (quantized) features -> waveform at `sample_rate_output`."""
        x, sq = self._frames(feats, self.config.decoder.input_dim, "features")
        return self._run(("decoder",), x, sq, "audio", "features")

    qfeats_to_sig = feats_to_sig

    def feats_to_toks(self, feats) -> Tensor:
        x, sq = self._frames(feats, self.config.encoder.dim, "features")
        return self._run(("compressor",), x, sq, "toks", "features")

    def feats_to_codes(self, feats) -> Tensor:
        return self.toks_to_codes(self.feats_to_toks(feats))

    def feats_to_qfeats(self, feats) -> Tensor:
        x, sq = self._frames(feats, self.config.encoder.dim, "features")
        return self._run(("compressor", "decompressor"), x, sq, "qfeats", "features")

    def sig_to_lats(self, sig) -> Tensor:
        return self._run(("encoder", "compressor"), *self._sig(sig), keep="lats", name="audio")

    def sig_to_toks(self, sig) -> Tensor:
        return self._run(("encoder", "compressor"), *self._sig(sig), keep="toks", name="audio")

    def sig_to_toks_float32(self, sig, name: str = "audio") -> Tensor:
        """sig_to_toks on this codec's weights in float32 (`float32_model`), the input rounded to
        the codec's dtype first: the tokens a float16 codec gives a row that overflowed, without
        running it in float16 again (`encode-corpus` reruns such a file alone). Counted in
        `fp32_rows` and logged, as `sig_to_toks`'s own recompute is."""
        x, sq = self._sig(sig)
        toks = self._run(("encoder", "compressor"), x, sq, keep="toks", name=name, wide=True)
        if self.dtype != torch.float32:
            self.fp32_rows += x.shape[0]
            log.warning("float16 overflowed on %s; recomputed in float32", name)
        return toks

    def sig_to_codes(self, sig) -> Tensor:
        return self.toks_to_codes(self.sig_to_toks(sig))

    def sig_to_qfeats(self, sig) -> Tensor:
        return self._run(("encoder", "compressor", "decompressor"), *self._sig(sig), keep="qfeats", name="audio")

    def toks_to_sig(self, toks) -> Tensor:
        return self._run(("decompressor", "decoder"), *self._toks(toks), keep="audio", name="tokens")

    def codes_to_sig(self, codes) -> Tensor:
        x, sq = self._frames(codes, self.code_dim, "codes")
        return self._run(("decompressor", "decoder"), x, sq, "audio", "codes")

    def sig_to_sig(self, sig) -> Tensor:
        """Round trip; output cut or right-padded (last sample repeated) to N * sr_out / sr_in."""
        x, sq = self._sig(sig)
        n_out = int(x.shape[1] * self.sample_rate_output / self.sample_rate_input)
        rec = self._run(("encoder", "compressor", "decompressor", "decoder"), x, False, "audio", "audio")
        if rec.shape[1] >= n_out:
            rec = rec[:, :n_out]
        else:
            rec = torch.cat([rec, rec[:, -1:].expand(-1, n_out - rec.shape[1])], 1)
        return rec[0] if sq else rec

    def encode(self, sig, sample_rate: int = SAMPLE_RATE_INPUT) -> Tensor:
        """Waveform -> tokens (int64). Audio at another rate is resampled to 16 kHz (soxr HQ)."""
        if sample_rate != self.sample_rate_input:
            sig = self._resample(sig, sample_rate)
        return self.sig_to_toks(sig)

    def _resample(self, sig, sample_rate) -> Tensor:
        number = isinstance(sample_rate, (int, float, np.integer, np.floating)) and not isinstance(sample_rate, (bool, np.bool_))
        if not number or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise InputError(f"sample_rate must be a number of Hz in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}], "
                             f"got {sample_rate!r}")
        sig, squeeze = check_audio(sig, frame=max(1, round(self.config.hop_samples * sample_rate / self.sample_rate_input)))
        n_out = math.ceil(sig.shape[1] * self.sample_rate_input / sample_rate)
        check_fits(2 * 4 * sig.shape[0] * n_out, "cpu",  # soxr's output, then its contiguous copy
                   f"audio of {sig.shape[0]} x {sig.shape[1]} samples at {sample_rate} Hz, resampled to 16 kHz,",
                   "use a smaller batch or split the input")
        import soxr

        x = sig.float().cpu().numpy().T  # soxr takes (frames, channels): rows become channels
        y = soxr.resample(x, sample_rate, self.sample_rate_input, quality="HQ")
        out = torch.from_numpy(np.ascontiguousarray(y.T))
        return out[0] if squeeze else out

    def decode(self, toks) -> Tensor:
        """Tokens -> waveform (float32) at `sample_rate_output`."""
        return self.toks_to_sig(toks)

    # ------------------------------------------------------------------ streaming
    def stream_encoder(self, batch_size: int = 1, cuda_graphs: bool | None = None) -> "StreamEncoder":
        from .streaming import StreamEncoder

        return StreamEncoder(self, batch_size, cuda_graphs)

    def stream_decoder(self, batch_size: int = 1, cuda_graphs: bool | None = None) -> "StreamDecoder":
        from .streaming import StreamDecoder

        return StreamDecoder(self, batch_size, cuda_graphs)

    def stream(self, batch_size: int = 1, cuda_graphs: bool | None = None) -> "Stream":
        from .streaming import Stream

        return Stream(self, batch_size, cuda_graphs)
