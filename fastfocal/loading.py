"""Loading official FocalCodec checkpoints (local directory, config.json path or hub id)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from . import cpu
from .kernels import _common
from .codec import Codec
from .config import CodecConfig, ConfigError, load_config, preset
from .inputs import check_fits, resolve_device_dtype
from .model import FocalCodecModel
from .version import __version__

DEFAULT_MODEL = "lucadellalib/focalcodec_50hz_4k_causal"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_TIMEOUT = 3.0  # seconds for the one metadata request made when a model is not cached


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not match its config."""


def resolve(source: str | os.PathLike) -> tuple[Path, Path | None]:
    """Return (config.json path, weights path or None) for a directory, config path or hub id."""
    if not isinstance(source, (str, os.PathLike)):  # Path(None) fails deep in pathlib without naming the argument
        raise TypeError(f"model must be a directory, a config.json path or a hub id (str or path), "
                        f"got {type(source).__name__} {source!r:.80}")
    p = Path(source)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{p} has no config.json")
        return cfg, _find_weights(p)
    if p.is_file():
        if p.suffix != ".json":
            raise CheckpointError(f"{p} is not a config.json or a model directory")
        return p, _find_weights(p.parent)
    s = str(source)
    if _HUB_ID.match(s) and not s.startswith((".", "/")):
        return _from_hub(s)
    raise CheckpointError(f"model {s!r} is neither a directory, a config.json nor a hub id (owner/name)")


def _find_weights(d: Path) -> Path | None:
    for name in ("model.safetensors", "model.pt"):
        if (d / name).is_file():
            return d / name
    return None


def _from_hub(repo_id: str) -> tuple[Path, Path | None]:
    """Local cache first (no network); otherwise one metadata request with a short timeout
    and no retries, so an offline machine fails in seconds, then the normal download."""
    try:
        import huggingface_hub as hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} looks like a hub id but huggingface_hub is not installed: "
            "pip install huggingface_hub, or pass a local directory with config.json + model.safetensors"
        ) from None
    try:
        return _hub_files(hub, repo_id, local_files_only=True)
    except Exception:  # not (fully) cached
        pass
    try:
        hub.get_hf_file_metadata(hub.hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT)
        return _hub_files(hub, repo_id, local_files_only=False)
    except CheckpointError:
        raise
    except Exception as e:  # network, auth, missing repo: one clear line
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"cannot download {repo_id!r} from the hub and it is not in the local cache "
                              f"({type(e).__name__}: {msg}); pass --model DIR or --random-init PRESET") from None


def _hub_files(hub, repo_id: str, local_files_only: bool) -> tuple[Path, Path]:
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError
    cfg = Path(hub.hf_hub_download(repo_id, "config.json", local_files_only=local_files_only))
    for name in ("model.safetensors", "model.pt"):
        try:
            return cfg, Path(hub.hf_hub_download(repo_id, name, local_files_only=local_files_only))
        except EntryNotFoundError:
            continue
    raise CheckpointError(f"hub repo {repo_id!r} has no model.safetensors or model.pt")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a plain state dict (weights_only=True): {str(e).splitlines()[0]}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        hint = f" (its keys: {_short([repr(k) for k in sd], 4)})" if isinstance(sd, dict) else f" (a {type(sd).__name__})"
        raise CheckpointError(f"{path} is not a plain name -> tensor state dict{hint}")
    return sd


def remap_legacy(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Release 0.0.1 keeps q/k/v projections apart: concatenate them into qkv_proj."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".q_proj.weight")]:
        base = key[: -len(".q_proj.weight")]
        for kind in ("weight", "bias"):
            parts = [f"{base}.{n}_proj.{kind}" for n in "qkv"]
            # a checkpoint that also has qkv_proj keeps it: q/k/v are then reported as unexpected
            if all(p in out for p in parts) and f"{base}.qkv_proj.{kind}" not in out:
                shapes = [tuple(out[p].shape) for p in parts]
                if len({s[1:] for s in shapes}) != 1 or not shapes[0]:  # torch.cat would fail deep inside
                    raise CheckpointError(f"cannot join {base}.q/k/v_proj.{kind} into qkv_proj: shapes {shapes}")
                if not all(out[p].is_floating_point() for p in parts):  # cat would promote an int part silently
                    raise CheckpointError(f"{base}.q/k/v_proj.{kind} have dtypes {[out[p].dtype for p in parts]}: "
                                          "weights must be floating point")
                out[f"{base}.qkv_proj.{kind}"] = torch.cat([out.pop(p) for p in parts], 0)
    return out


def weights_hash(sd: dict[str, Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and raw bytes, as stored (before any dtype or
    device conversion, so fp32 and bf16 loads of one checkpoint share it). One pass, no copies
    of CPU tensors: each is hashed through a byte view of its memory."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach()
        h.update(f"{k}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        t = t.cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().data)  # numpy lacks bf16; bytes of any dtype
    return h.hexdigest()


def param_bytes(cfg: CodecConfig, dtype=torch.float32) -> int:
    """Bytes the model's parameters take in `dtype`, from the config alone (built on meta)."""
    with torch.device("meta"):
        model = FocalCodecModel(cfg)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() for t in model.state_dict().values()) * size


def provenance(codec: Codec) -> dict:
    """What made a token file: sidecars, corpus manifests and info.json record it."""
    out = {"fastfocal_version": __version__, "dtype": str(codec.dtype).removeprefix("torch."),
           "device": codec.device.type, "weights_hash": codec.weights_hash}
    if codec.device.type == "cuda" and _common.split_f32(codec.dtype):  # not float32's exact arithmetic
        out["f32_dot"] = _common.f32_dot()
    return out


def build(cfg: CodecConfig, sd: dict[str, Tensor] | None, device, dtype) -> FocalCodecModel:
    """Build on the meta device and assign the checkpoint tensors (checked by name and shape).
    The result carries `weights_hash` (see weights_hash)."""
    with torch.device("meta"):
        model = FocalCodecModel(cfg)
    expected = model.state_dict()
    if sd is None:
        raise CheckpointError("no weights given")
    # names and values first: an int key or a list value failed deep in the checks below
    bad_keys = [repr(k) for k in sd if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"checkpoint tensor names must be strings, got {_short(bad_keys)}")
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"checkpoint values must be tensors: {_short(not_tensors)}")
    sd = remap_legacy(sd)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    errs = []
    if missing:
        errs.append(f"missing tensors ({len(missing)}): {_short(missing)}")
    if unexpected:
        errs.append(f"unexpected tensors ({len(unexpected)}): {_short(unexpected)}")
    if bad:
        errs.append(f"mis-shaped tensors ({len(bad)}): {_short(bad)}")
    if errs:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(errs))
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"tensor {k} has non-float dtype {v.dtype}")
    # NaN/Inf weights only showed up at the first call, as a NumericsError blaming precision
    # ("try float32"); refuse them here, by name (one tensor at a time: no copy of the model).
    nonfinite = []
    for k in sorted(sd):
        v = sd[k]
        bad = int((~torch.isfinite(v.float() if v.element_size() == 1 else v)).sum())  # float8 lacks isfinite
        if bad:
            nonfinite.append(f"{k} ({bad} of {v.numel()})")
    if nonfinite:
        raise CheckpointError(f"checkpoint has NaN or Inf weights in {len(nonfinite)} tensor"
                              f"{'s' if len(nonfinite) > 1 else ''}: {_short(nonfinite)}")
    esize = torch.empty((), dtype=dtype).element_size()
    check_fits(sum(v.numel() for v in expected.values()) * esize, device, "the model's parameters")
    digest = weights_hash(sd)
    if torch.device(device).type == "cpu":
        cpu.keep_freed_memory()
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    model.weights_hash = digest
    return model.eval().requires_grad_(False)


def _short(items: list[str], n: int = 8) -> str:
    s = ", ".join(items[:n])
    return s + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def random_state_dict(cfg: CodecConfig, seed: int = 0) -> dict[str, Tensor]:
    """Deterministic random weights with sensible scales (for benchmarks and tests)."""
    with torch.device("meta"):
        model = FocalCodecModel(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        shape = tuple(v.shape)
        if k.endswith(("norm.weight", ".gamma")) or k.endswith("gru_rel_pos_const"):
            t = torch.ones(shape)
        elif k.endswith(".alpha"):
            t = torch.full(shape, 0.5) if shape == (1,) else torch.ones(shape)
        elif k.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.02
        else:
            fan_in = max(1, v[0].numel()) if len(shape) > 1 else shape[0]
            if "upscale.upscale" in k:  # ConvTranspose weight is (in, out, k)
                fan_in = shape[0]
            t = torch.randn(shape, generator=g) / fan_in ** 0.5
        out[k] = t
    return out


def config_from(source) -> CodecConfig:
    if isinstance(source, CodecConfig):
        return source
    if isinstance(source, dict):
        return CodecConfig.from_dict(source)
    s = str(source)
    p = Path(s)
    if p.is_dir():
        return load_config(p / "config.json")
    if p.is_file():
        return load_config(p)
    try:
        return preset(s)
    except ConfigError:
        raise ConfigError(f"{s!r} is neither a preset, a config path nor a model directory") from None


# =========================================================================== codecs
def load(source: str = DEFAULT_MODEL, device=None, dtype=None) -> Codec:
    """Load an official checkpoint: a local directory, a config.json path, or a hub id.

    device defaults to CUDA when available; dtype to float32 (the exact path).
    """
    device, dtype = resolve_device_dtype(device, dtype)
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
    device, dtype = resolve_device_dtype(device, dtype)
    cfg = config_from(preset_or_config)
    # the float32 weights are made on the host first: refuse absurd configs before that
    check_fits(param_bytes(cfg), "cpu", "random weights for this config (float32, host)")
    model = build(cfg, random_state_dict(cfg, seed), device, dtype)
    name = preset_or_config if isinstance(preset_or_config, str) else "custom"
    return Codec(model, name=f"random:{name}")


def open_codec(model: str | None = None, random_init_from: str | None = None, device=None, dtype="fp32") -> Codec:
    """The codec a command line or a worker names: a model (default DEFAULT_MODEL) or random
    weights for a preset/config. Local paths are made absolute, so sidecars and corpus
    info.json name the model the same way from any working directory. Errors name the model."""
    model = os.path.abspath(model) if model and os.path.exists(model) else model
    src = os.path.abspath(random_init_from) if random_init_from and os.path.exists(random_init_from) else random_init_from
    try:
        if src:
            return random_init(src, device=device, dtype=dtype)
        return load(model or DEFAULT_MODEL, device=device, dtype=dtype)
    except ConfigError as e:  # config messages do not always name the file
        raise ConfigError(f"{src or model or DEFAULT_MODEL}: {e}") from None
