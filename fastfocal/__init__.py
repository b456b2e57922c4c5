"""fastfocal: fast inference for the FocalCodec / FocalCodec-Stream speech codecs."""
from __future__ import annotations

import torch

from .codec import Codec, InputError
from .config import CodecConfig, ConfigError, load_config, preset
from .engine import StreamEngine
from .loading import DEFAULT_MODEL, CheckpointError, build, config_from, random_state_dict, read_state_dict, resolve
from .streaming import Stream, StreamDecoder, StreamEncoder

__version__ = "0.1.0"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 is supported on GPU only; use bfloat16 or float32 on CPU")
    return device, dtype


def load(source: str = DEFAULT_MODEL, device=None, dtype=None) -> Codec:
    """Load an official checkpoint: a local directory, a config.json path, or a hub id.

    device defaults to CUDA when available; dtype to float32 (the exact path).
    """
    device, dtype = _resolve_device_dtype(device, dtype)
    cfg_path, weights = resolve(source)
    cfg = load_config(cfg_path)
    if weights is None:
        raise CheckpointError(f"no model.safetensors or model.pt next to {cfg_path}")
    model = build(cfg, read_state_dict(weights), device, dtype)
    return Codec(model, name=str(source))


def random_init(preset_or_config="50hz_4k_causal", seed: int = 0, device=None, dtype=None) -> Codec:
    """A model with deterministic random weights, for benchmarks without a checkpoint.

    Accepts a preset name ('50hz_4k_causal', '50hz_2k_causal', '50hz_65k_causal'), a hub id of
    one, a config.json path, a model directory, a dict or a CodecConfig.
    """
    device, dtype = _resolve_device_dtype(device, dtype)
    cfg = config_from(preset_or_config)
    model = build(cfg, random_state_dict(cfg, seed), device, dtype)
    name = preset_or_config if isinstance(preset_or_config, str) else "custom"
    return Codec(model, name=f"random:{name}")


__all__ = [
    "Codec", "CodecConfig", "ConfigError", "CheckpointError", "InputError", "Stream", "StreamDecoder",
    "StreamEncoder", "StreamEngine", "load", "random_init", "load_config", "preset", "DEFAULT_MODEL",
]
