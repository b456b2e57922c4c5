"""fastfocal: fast inference for the FocalCodec / FocalCodec-Stream speech codecs."""
from __future__ import annotations

from .codec import Codec
from .config import CodecConfig, ConfigError, load_config, preset
from .engine import StreamEngine, freeze_heap
from .inputs import InputError
from .kernels._common import F32_DOTS, f32_dot, set_f32_dot
from .loading import (DEFAULT_MODEL, CheckpointError, build, config_from, load, open_codec, random_init,
                      random_state_dict, read_state_dict, resolve)
from .streaming import Stream, StreamDecoder, StreamEncoder
from .version import __version__

__all__ = [
    "Codec", "CodecConfig", "ConfigError", "CheckpointError", "InputError", "Stream", "StreamDecoder",
    "StreamEncoder", "StreamEngine", "freeze_heap", "load", "random_init", "open_codec", "load_config", "preset", "DEFAULT_MODEL",
    "set_f32_dot", "f32_dot", "F32_DOTS",
]
