"""Model configuration: the five parts of an official `config.json`, validated.

Every module size comes from here; nothing else in the package hard-codes a dimension.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that is malformed, incomplete or has unknown keys."""


@dataclass(frozen=True)
class WavLMConfig:
    hidden_dims: tuple[int, ...] = (512,) * 7
    kernel_sizes: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    num_layers: int = 6
    dim: int = 1024
    ffn_dim: int = 4096
    num_heads: int = 16
    num_buckets: int = 320
    max_distance: int = 800
    max_cached_steps: int = 2048
    dropout: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    causal: bool = True
    window_size: int = 512
    lookahead_size: int = 3
    use_flex_attention: bool = False


@dataclass(frozen=True)
class FocalEncoderConfig:
    input_dim: int = 1024
    output_dim: int = 12
    hidden_dims: tuple[int, ...] = (1024, 512, 256)
    downscale_factors: tuple[int, ...] = (1, 1, 1)
    focal_window: int = 14
    focal_level: int = 2
    focal_factor: int = 4
    dropout: float = 0.0
    use_post_norm: bool = False
    use_layerscale: bool = False
    layerscale_init: float = 1e-4
    tanhscale_init: float = 0.5
    normalize_modulator: bool = False
    causal: bool = True
    window_size: int = 512


@dataclass(frozen=True)
class BSQConfig:
    codebook_size: int = 4096


@dataclass(frozen=True)
class FocalDecoderConfig:
    input_dim: int = 12
    output_dim: int = 1024
    hidden_dims: tuple[int, ...] = (256, 512, 1024)
    upscale_factors: tuple[int, ...] = (1, 1, 1)
    focal_window: int = 14
    focal_level: int = 2
    focal_factor: int = 4
    dropout: float = 0.0
    use_post_norm: bool = False
    use_layerscale: bool = False
    layerscale_init: float = 1e-4
    tanhscale_init: float = 0.5
    normalize_modulator: bool = False
    causal: bool = True
    window_size: int = 512
    last_window_size: int = 512
    lookahead_size: int = 3


@dataclass(frozen=True)
class WaveNeXtConfig:
    input_dim: int = 1024
    num_layers: int = 8
    dim: int = 1024
    ffn_dim: int = 2048
    kernel_size: int = 7
    layerscale_init: float | None = None
    hop_length: int = 480
    causal: bool = True


@dataclass(frozen=True)
class VocosConfig:
    input_dim: int = 1024
    num_layers: int = 8
    dim: int = 512
    ffn_dim: int = 1536
    kernel_size: int = 7
    layerscale_init: float | None = None
    n_fft: int = 1024
    hop_length: int = 320
    causal: bool = False


# part -> {accepted class name: dataclass}
_PARTS: dict[str, dict[str, type]] = {
    "encoder": {"WavLM": WavLMConfig},
    "compressor": {"FocalEncoder": FocalEncoderConfig},
    "quantizer": {"BinarySphericalQuantizer": BSQConfig},
    "decompressor": {"FocalDecoder": FocalDecoderConfig},
    "decoder": {"WaveNeXt": WaveNeXtConfig, "Vocos": VocosConfig},
}

PRESETS = {
    "50hz_2k_causal": "focalcodec_50hz_2k_causal.json",
    "50hz_4k_causal": "focalcodec_50hz_4k_causal.json",
    "50hz_65k_causal": "focalcodec_50hz_65k_causal.json",
}


def _coerce(part: str, key: str, value: Any, ftype: Any) -> Any:
    """Check one value against its dataclass field type; tuples from JSON lists."""
    t = str(ftype)
    if t.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{part}_config.{key} must be a list of integers, got {value!r}")
        return tuple(value)
    if t == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{part}_config.{key} must be true/false, got {value!r}")
        return value
    if t == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{part}_config.{key} must be an integer, got {value!r}")
        return value
    if t.startswith("float"):
        if value is None and "None" in t:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{part}_config.{key} must be a number, got {value!r}")
        return float(value)
    return value


# Size fields that may be 0; every other integer field must be >= 1.
_MAY_BE_ZERO = {"lookahead_size", "focal_factor"}
# Window and kernel sizes (frames or samples): official models use <= 512. Larger ones are
# refused up front because streaming state grows with them (a ring per layer per stream).
_WINDOW_FIELDS = {"window_size", "last_window_size", "lookahead_size", "focal_window", "conv_pos",
                  "kernel_sizes", "kernel_size", "max_distance", "max_cached_steps"}
MAX_WINDOW = 1 << 16
# Any other size: far above any real model, low enough that products of sizes stay sane.
# (Parameter memory is checked against the device in loading.build.)
MAX_SIZE = 1 << 24
# Counts of layers and levels (official models: 6-8 layers, 3 focal blocks, 2 levels). The model
# is built on the meta device before its parameter bytes can be checked, and every layer costs
# ~40 KB of host memory and ~1 ms there even on meta: num_layers 2^24 would take ~700 GB and
# hours before any refusal, so counts get their own, much lower limit.
_COUNT_FIELDS = {"num_layers", "focal_level", "hidden_dims", "kernel_sizes", "strides",
                 "downscale_factors", "upscale_factors"}
MAX_LAYERS = 256
# config.json is ~2 KB; a bigger file is no config (a 1 TB sparse file was read whole: MemoryError).
MAX_CONFIG_BYTES = 1 << 20


def _check_sizes(part: str, obj) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{part}_config.{f.name}"
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {v!r}")
        if isinstance(v, bool) or not isinstance(v, (int, tuple)):
            continue
        count = len(v) if isinstance(v, tuple) else v
        if f.name in _COUNT_FIELDS and count > MAX_LAYERS:
            what = f"lists {count} layers" if isinstance(v, tuple) else f"is {v}"
            raise ConfigError(f"{key} {what}, more than the limit of {MAX_LAYERS} layers")
        lo = 0 if f.name in _MAY_BE_ZERO else 1
        hi = MAX_WINDOW if f.name in _WINDOW_FIELDS else MAX_SIZE
        for x in (v if isinstance(v, tuple) else (v,)):
            if x < lo:
                raise ConfigError(f"{key} must be >= {lo}, got {v!r}")
            if x > hi:
                raise ConfigError(f"{key} is {x}, larger than the limit {hi}")


@dataclass(frozen=True)
class CodecConfig:
    encoder: WavLMConfig = field(default_factory=WavLMConfig)
    compressor: FocalEncoderConfig = field(default_factory=FocalEncoderConfig)
    quantizer: BSQConfig = field(default_factory=BSQConfig)
    decompressor: FocalDecoderConfig = field(default_factory=FocalDecoderConfig)
    decoder: WaveNeXtConfig | VocosConfig = field(default_factory=WaveNeXtConfig)

    @property
    def causal(self) -> bool:
        return self.encoder.causal

    @property
    def code_dim(self) -> int:
        return self.compressor.output_dim

    @property
    def is_wavenext(self) -> bool:
        return isinstance(self.decoder, WaveNeXtConfig)

    @classmethod
    def from_dict(cls, d: Any) -> "CodecConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        known = {f"{p}_{s}" for p in _PARTS for s in ("name", "config")}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown top-level config keys: {unknown}")
        parts = {}
        for part, classes in _PARTS.items():
            name = d.get(f"{part}_name")
            if name is None:
                raise ConfigError(f"config is missing '{part}_name'")
            if not isinstance(name, str) or name not in classes:  # a list or object is no name (and unhashable)
                raise ConfigError(
                    f"unsupported {part}_name {name!r}; expected one of {sorted(classes)}"
                )
            sub = d.get(f"{part}_config", {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{part}_config must be a JSON object")
            dc = classes[name]
            fields = {f.name: f for f in dataclasses.fields(dc)}
            bad = sorted(set(sub) - set(fields))
            if bad:
                raise ConfigError(f"unknown keys in {part}_config ({name}): {bad}")
            kwargs = {k: _coerce(part, k, v, fields[k].type) for k, v in sub.items()}
            parts[part] = dc(**kwargs)
        cfg = cls(**parts)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        names = {
            "encoder": "WavLM",
            "compressor": "FocalEncoder",
            "quantizer": "BinarySphericalQuantizer",
            "decompressor": "FocalDecoder",
            "decoder": "WaveNeXt" if self.is_wavenext else "Vocos",
        }
        out = {}
        for part, name in names.items():
            out[f"{part}_name"] = name
            sub = dataclasses.asdict(getattr(self, part))
            out[f"{part}_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sub.items()}
        return out

    def validate(self) -> None:
        e, c, q, dc, dec = self.encoder, self.compressor, self.quantizer, self.decompressor, self.decoder
        for part in _PARTS:  # first: the checks below divide by these sizes
            _check_sizes(part, getattr(self, part))
        if e.num_buckets < 4 or e.max_distance <= e.num_buckets // 4:
            raise ConfigError(f"encoder_config.num_buckets must be >= 4 and max_distance > num_buckets / 4 "
                              f"(got {e.num_buckets}, {e.max_distance})")
        n = len(e.hidden_dims)
        if not (n == len(e.kernel_sizes) == len(e.strides)) or n == 0:
            raise ConfigError("encoder hidden_dims, kernel_sizes and strides must have equal, non-zero length")
        if e.dim % e.num_heads:
            raise ConfigError(f"encoder dim {e.dim} is not divisible by num_heads {e.num_heads}")
        if e.dim % e.conv_pos_groups:
            raise ConfigError(f"encoder dim {e.dim} is not divisible by conv_pos_groups {e.conv_pos_groups}")
        cs = q.codebook_size
        if cs < 2 or cs & (cs - 1):
            raise ConfigError(f"quantizer codebook_size must be a power of two >= 2, got {cs}")
        if cs.bit_length() - 1 != c.output_dim:
            raise ConfigError(
                f"compressor output_dim {c.output_dim} != log2(codebook_size {cs})"
            )
        if dc.input_dim != c.output_dim:
            raise ConfigError("decompressor input_dim must equal compressor output_dim")
        if c.input_dim != e.dim:
            raise ConfigError("compressor input_dim must equal encoder dim")
        for part, p in (("compressor", c), ("decompressor", dc)):
            if not p.hidden_dims:
                raise ConfigError(f"{part}_config.hidden_dims must list at least one layer, got []")
        if len(c.hidden_dims) != len(c.downscale_factors) or len(dc.hidden_dims) != len(dc.upscale_factors):
            raise ConfigError("focal hidden_dims and scale factors must have equal length")
        if dec.input_dim != dc.output_dim:
            raise ConfigError("decoder input_dim must equal decompressor output_dim")
        if not self.is_wavenext:
            # the head's n_fft + 2 outputs split into n_fft/2 + 1 magnitudes and as many phases
            # (odd n_fft failed deep inside decoding); hop < n_fft keeps the overlap-add
            # envelope non-zero (hop >= n_fft gave a few hundred samples of garbage or NaN)
            if dec.n_fft % 2 or dec.n_fft < 2:
                raise ConfigError(f"decoder_config.n_fft must be even, got {dec.n_fft}")
            if dec.hop_length >= dec.n_fft:
                raise ConfigError(f"decoder_config.hop_length ({dec.hop_length}) must be smaller than n_fft ({dec.n_fft})")
        if dec.hop_length * 16000 % self.hop_samples:  # else the output rate is rounded: audio mislabelled
            raise ConfigError(f"decoder_config.hop_length {dec.hop_length} x 16000 Hz is not a multiple of the "
                              f"encoder's {self.hop_samples} samples a frame: the output rate would not be a whole number of Hz")
        if not (e.causal == c.causal == dc.causal == dec.causal):
            raise ConfigError("all parts must agree on 'causal'")
        if e.causal:
            if not self.is_wavenext:
                raise ConfigError("causal models use the WaveNeXt decoder")
            if any(f != 1 for f in c.downscale_factors) or any(f != 1 for f in dc.upscale_factors):
                raise ConfigError("causal streaming supports scale factors of 1 only")
            if e.lookahead_size != dc.lookahead_size:
                raise ConfigError("encoder and decompressor lookahead_size must match")
            chunk = e.lookahead_size + 1
            if e.window_size <= chunk:
                raise ConfigError("encoder window_size must exceed the chunk (lookahead + 1)")
            if dec.kernel_size < 2:  # the streaming convs' rings hold kernel_size - 1 >= 1 past frames
                raise ConfigError(f"decoder_config.kernel_size must be >= 2 for a causal model, got {dec.kernel_size}")
        for name, v in (("dropout", c.dropout), ("dropout", dc.dropout), ("dropout", e.dropout)):
            if v < 0 or v >= 1:
                raise ConfigError(f"{name} must be in [0, 1)")
        for part in (c, dc):
            if part.use_post_norm or part.use_layerscale or part.normalize_modulator:
                raise ConfigError(
                    "use_post_norm, use_layerscale and normalize_modulator are not used by any "
                    "released FocalCodec checkpoint and are not supported"
                )

    # derived quantities -------------------------------------------------
    @property
    def hop_samples(self) -> int:
        """Input samples per encoder frame (320)."""
        h = 1
        for s in self.encoder.strides:
            h *= s
        return h

    @property
    def token_hop(self) -> int:
        """Input samples per token."""
        f = 1
        for s in self.compressor.downscale_factors:
            f *= s
        return self.hop_samples * f

    @property
    def chunk_frames(self) -> int:
        return self.encoder.lookahead_size + 1

    @property
    def sample_rate_output(self) -> int:
        # WaveNeXt: 480 samples per 20 ms frame -> 24 kHz; Vocos: hop 320 per frame -> 16 kHz
        return self.decoder.hop_length * 16000 // self.hop_samples


def load_config(path: str | Path) -> CodecConfig:
    path = Path(path)
    try:
        with open(path, "rb") as f:  # at most MAX_CONFIG_BYTES + 1: a huge file is never read whole
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES:,} bytes: not a config.json")
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (at byte offset {e.start})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"config {path} is nested too deeply to be a config") from None
    return CodecConfig.from_dict(d)


def preset(name: str) -> CodecConfig:
    """A full-size official config by short name ('50hz_4k_causal') or hub id."""
    key = name.split("/")[-1].removeprefix("focalcodec_")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return load_config(Path(__file__).parent / "presets" / PRESETS[key])
