"""The user-facing Codec: offline API with the upstream method names, and streaming sessions."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from . import ops
from .config import CodecConfig
from .model import FocalCodecModel, num_params
from .state import FocalState, decoder_side, encoder_side

if TYPE_CHECKING:
    from .streaming import Stream, StreamDecoder, StreamEncoder

SAMPLE_RATE_INPUT = 16000


from .inputs import InputError, as_tensor as _as_tensor  # noqa: E402  (interim: pipeline refactor)


class Codec:
    """A loaded FocalCodec model. Build with `fastfocal.load(...)` or `fastfocal.random_init(...)`.

    Causal models run offline as long streaming segments over a fresh state: memory is
    O(segment · window) whatever the input length, and offline equals streaming exactly.
    """

    segment_frames = 2048  # frames per offline segment (~41 s): bounds activation memory

    def __init__(self, model: FocalCodecModel, name: str = "custom"):
        self.model = model
        self.config: CodecConfig = model.cfg
        self.name = name
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

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

    # ------------------------------------------------------------------ input checks
    def _check_sig(self, sig) -> tuple[Tensor, bool]:
        sig = _as_tensor(sig, "audio")
        if not sig.is_floating_point():
            raise InputError(
                f"audio must be floating point in [-1, 1], got {sig.dtype} "
                "(convert integer PCM with x / 32768)"
            )
        squeeze = sig.dim() == 1
        if squeeze:
            sig = sig.unsqueeze(0)
        if sig.dim() != 2:
            raise InputError(f"audio must be (samples,) or (batch, samples), got shape {tuple(sig.shape)}")
        if sig.shape[0] == 0 or sig.shape[1] == 0:
            raise InputError(f"audio is empty (shape {tuple(sig.shape)})")
        if not bool(torch.isfinite(sig).all()):
            raise InputError("audio contains NaN or Inf")
        return sig.to(self.device, self.dtype), squeeze

    def _check_toks(self, toks) -> tuple[Tensor, bool]:
        toks = _as_tensor(toks, "tokens")
        if toks.is_floating_point() or toks.is_complex() or toks.dtype == torch.bool:
            raise InputError(f"tokens must be an integer tensor, got {toks.dtype}")
        squeeze = toks.dim() == 1
        if squeeze:
            toks = toks.unsqueeze(0)
        if toks.dim() != 2:
            raise InputError(f"tokens must be (T,) or (batch, T), got shape {tuple(toks.shape)}")
        if toks.numel() == 0:
            raise InputError(f"tokens are empty (shape {tuple(toks.shape)})")
        lo, hi = int(toks.min()), int(toks.max())
        if lo < 0 or hi >= self.codebook_size:
            raise InputError(f"token out of range [0, {self.codebook_size}): found values in [{lo}, {hi}]")
        return toks.to(self.device, torch.long), squeeze

    def _check_frames(self, x, dim: int, what: str) -> tuple[Tensor, bool]:
        x = _as_tensor(x, what)
        if not x.is_floating_point():
            raise InputError(f"{what} must be floating point, got {x.dtype}")
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != dim:
            raise InputError(f"{what} must be (T, {dim}) or (batch, T, {dim}), got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise InputError(f"{what} are empty (shape {tuple(x.shape)})")
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"{what} contain NaN or Inf")
        return x.to(self.device, self.dtype), squeeze

    # ------------------------------------------------------------------ stage runners
    def _ctx(self):
        return torch.inference_mode()

    def _segmented(self, fn, x: Tensor, states, step: int) -> Tensor:
        """Run a causal stage over time segments of `step` units along dim 1 (after batch)."""
        idx = torch.arange(x.shape[0], device=self.device)
        outs = [fn(x[:, a:a + step], *states, idx) for a in range(0, x.shape[1], step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def _encode_feats(self, sig: Tensor) -> Tensor:
        m = self.model
        if not self.causal:
            return m.encoder(sig)
        st = encoder_side(self.config, sig.shape[0], self.device, self.dtype)[0]
        return self._segmented(lambda s, st_, idx: m.encoder(s, st_, idx), sig, (st,), self.segment_frames * self.config.hop_samples)

    def _compress(self, feats: Tensor) -> Tensor:
        m = self.model
        if not self.causal:
            return m.compressor(feats)
        st = FocalState.allocate(self.config.compressor, feats.shape[0], self.device, self.dtype)
        return self._segmented(lambda f, s, idx: m.compressor(f, s, idx), feats, (st,), self.segment_frames)

    def _decompress(self, codes: Tensor) -> Tensor:
        m = self.model
        if not self.causal:
            return m.decompressor(codes)
        st = decoder_side(self.config, codes.shape[0], self.device, self.dtype)[0]
        return self._segmented(lambda c, s, idx: m.decompressor(c, s, idx), codes, (st,), self.segment_frames)

    def _decode(self, qfeats: Tensor) -> Tensor:
        m = self.model
        if not self.causal:
            return m.decoder(qfeats)
        st = decoder_side(self.config, qfeats.shape[0], self.device, self.dtype)[1]
        return self._segmented(lambda q, s, idx: m.decoder(q, s, idx), qfeats, (st,), self.segment_frames)

    @staticmethod
    def _out(x: Tensor, squeeze: bool) -> Tensor:
        return x[0] if squeeze else x

    # ------------------------------------------------------------------ offline API
    def sig_to_feats(self, sig) -> Tensor:
        sig, sq = self._check_sig(sig)
        with self._ctx():
            return self._out(self._encode_feats(sig), sq)

    def feats_to_lats(self, feats) -> Tensor:
        feats, sq = self._check_frames(feats, self.config.encoder.dim, "features")
        with self._ctx():
            return self._out(self._compress(feats), sq)

    def lats_to_toks(self, lats) -> Tensor:
        lats, sq = self._check_frames(lats, self.code_dim, "latents")
        return self._out(ops.bsq_quantize(lats)[0], sq)

    def lats_to_codes(self, lats) -> Tensor:
        lats, sq = self._check_frames(lats, self.code_dim, "latents")
        return self._out(ops.bsq_quantize(lats)[1], sq)

    def toks_to_codes(self, toks) -> Tensor:
        toks, sq = self._check_toks(toks)
        return self._out(ops.bsq_codes(toks, self.code_dim, self.dtype), sq)

    def codes_to_toks(self, codes) -> Tensor:
        codes, sq = self._check_frames(codes, self.code_dim, "codes")
        return self._out(ops.bsq_quantize(codes)[0], sq)

    def codes_to_qfeats(self, codes) -> Tensor:
        codes, sq = self._check_frames(codes, self.code_dim, "codes")
        with self._ctx():
            return self._out(self._decompress(codes), sq)

    def toks_to_qfeats(self, toks) -> Tensor:
        toks, sq = self._check_toks(toks)
        with self._ctx():
            return self._out(self._decompress(toks), sq)

    def feats_to_sig(self, feats) -> Tensor:
        """Decoder alone: (quantized) features -> waveform at `sample_rate_output`."""
        feats, sq = self._check_frames(feats, self.config.decoder.input_dim, "features")
        with self._ctx():
            return self._out(self._decode(feats), sq)

    qfeats_to_sig = feats_to_sig

    def feats_to_toks(self, feats) -> Tensor:
        return self.lats_to_toks(self.feats_to_lats(feats))

    def feats_to_codes(self, feats) -> Tensor:
        return self.lats_to_codes(self.feats_to_lats(feats))

    def feats_to_qfeats(self, feats) -> Tensor:
        return self.codes_to_qfeats(self.feats_to_codes(feats))

    def sig_to_lats(self, sig) -> Tensor:
        sig, sq = self._check_sig(sig)
        with self._ctx():
            return self._out(self._compress(self._encode_feats(sig)), sq)

    def sig_to_toks(self, sig) -> Tensor:
        return self.lats_to_toks(self.sig_to_lats(sig))

    def sig_to_codes(self, sig) -> Tensor:
        return self.lats_to_codes(self.sig_to_lats(sig))

    def sig_to_qfeats(self, sig) -> Tensor:
        return self.codes_to_qfeats(self.sig_to_codes(sig))

    def toks_to_sig(self, toks) -> Tensor:
        toks, sq = self._check_toks(toks)
        with self._ctx():
            return self._out(self._decode(self._decompress(toks)), sq)

    def codes_to_sig(self, codes) -> Tensor:
        codes, sq = self._check_frames(codes, self.code_dim, "codes")
        with self._ctx():
            return self._out(self._decode(self._decompress(codes)), sq)

    def sig_to_sig(self, sig) -> Tensor:
        """Round trip; output cut or right-padded (last sample repeated) to N * sr_out / sr_in."""
        sig, sq = self._check_sig(sig)
        n_out = int(sig.shape[1] * self.sample_rate_output / self.sample_rate_input)
        with self._ctx():
            _, codes = ops.bsq_quantize(self._compress(self._encode_feats(sig)))
            rec = self._decode(self._decompress(codes))
        if rec.shape[1] >= n_out:
            rec = rec[:, :n_out]
        else:
            rec = torch.cat([rec, rec[:, -1:].expand(-1, n_out - rec.shape[1])], 1)
        return self._out(rec, sq)

    def encode(self, sig, sample_rate: int = SAMPLE_RATE_INPUT) -> Tensor:
        """Waveform -> tokens (int64). Audio at another rate is resampled to 16 kHz (soxr HQ)."""
        if sample_rate != self.sample_rate_input:
            sig = self._resample(sig, sample_rate)
        return self.sig_to_toks(sig)

    def _resample(self, sig, sample_rate) -> Tensor:
        if not isinstance(sample_rate, (int, float)) or isinstance(sample_rate, bool) or not 1000 <= sample_rate <= 384000:
            raise InputError(f"sample_rate must be a number of Hz in [1000, 384000], got {sample_rate!r}")
        sig, squeeze = self._check_sig(sig)
        import soxr

        x = sig.float().cpu().numpy().T  # soxr takes (frames, channels): rows become channels
        y = soxr.resample(x, sample_rate, self.sample_rate_input, quality="HQ")
        out = torch.from_numpy(np.ascontiguousarray(y.T))
        return out[0] if squeeze else out

    def decode(self, toks) -> Tensor:
        """Tokens -> waveform at `sample_rate_output`."""
        return self.toks_to_sig(toks)

    # ------------------------------------------------------------------ streaming
    def _need_causal(self):
        if not self.causal:
            raise InputError(f"streaming needs a causal model; {self.name} is non-causal")

    def stream_encoder(self, batch_size: int = 1) -> "StreamEncoder":
        from .streaming import StreamEncoder

        self._need_causal()
        return StreamEncoder(self, batch_size)

    def stream_decoder(self, batch_size: int = 1) -> "StreamDecoder":
        from .streaming import StreamDecoder

        self._need_causal()
        return StreamDecoder(self, batch_size)

    def stream(self, batch_size: int = 1) -> "Stream":
        from .streaming import Stream

        self._need_causal()
        return Stream(self, batch_size)

