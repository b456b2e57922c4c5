"""Loading official checkpoints: formats, legacy names, and clear errors."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastfocal
from fastfocal.config import CodecConfig, ConfigError, preset
from fastfocal.loading import CheckpointError
from fastfocal.model import FocalCodecModel

from helpers import assert_close

T = torch.from_numpy


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def edit_config(d: Path, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_load_from_dir_and_config_path(data_dir, golden_causal):
    a = fastfocal.load(data_dir / "tiny_causal", device="cpu")
    b = fastfocal.load(data_dir / "tiny_causal" / "config.json", device="cpu")
    sig = T(golden_causal["sig"][:, :6400])
    assert torch.equal(a.sig_to_toks(sig), b.sig_to_toks(sig))


def test_properties(causal, noncausal):
    assert causal.sample_rate_input == 16000 and causal.sample_rate_output == 24000
    assert causal.chunk_size == 1280 and causal.latency == 80.0 and causal.causal
    assert causal.codebook_size == 4096 and causal.token_rate == 50.0
    assert noncausal.sample_rate_output == 16000 and noncausal.latency is None
    assert noncausal.token_rate == 25.0 and noncausal.codebook_size == 8192
    assert causal.num_params == 1727778 and noncausal.num_params == 1230137  # info.json


def test_pt_checkpoint_and_legacy_qkv(tmp_path, data_dir, golden_causal):
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    for k in [k for k in sd if k.endswith("qkv_proj.weight") or k.endswith("qkv_proj.bias")]:
        q, kk, v = sd.pop(k).chunk(3, 0)
        base = k.replace("qkv_proj", "{}_proj")
        sd[base.format("q")], sd[base.format("k")], sd[base.format("v")] = q, kk, v
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "model.pt")
    codec = fastfocal.load(d, device="cpu")
    assert_close("feats", codec.sig_to_feats(T(golden_causal["sig"])), golden_causal["feats"])


def test_pt_with_pickled_object_refused(tmp_path, data_dir):
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    (d / "model.safetensors").unlink()
    torch.save({"model": torch.nn.Linear(2, 2)}, d / "model.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        fastfocal.load(d, device="cpu")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda sd: sd.pop("decoder.head.proj.bias"), r"missing tensors .*decoder\.head\.proj\.bias"),
        (lambda sd: sd.__setitem__("encoder.extra.weight", torch.zeros(2)), r"unexpected tensors .*encoder\.extra\.weight"),
        (
            lambda sd: sd.__setitem__("compressor.out_proj.weight", torch.zeros(11, 32)),
            r"mis-shaped tensors .*compressor\.out_proj\.weight: checkpoint \(11, 32\) vs config \(12, 32\)",
        ),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_tensor_errors_name_the_tensor(tmp_path, data_dir, mutate, match):
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    mutate(sd)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=match):
        fastfocal.load(d, device="cpu")


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda c: c["encoder_config"].__setitem__("attn_flavour", 1), r"unknown keys in encoder_config.*attn_flavour"),
        (lambda c: c.__setitem__("extra_part", {}), r"unknown top-level config keys.*extra_part"),
        (lambda c: c.__setitem__("decoder_name", "HiFiGAN"), r"unsupported decoder_name 'HiFiGAN'"),
        (lambda c: c.pop("quantizer_name"), r"missing 'quantizer_name'"),
        (lambda c: c["encoder_config"].__setitem__("num_heads", "4"), r"encoder_config.num_heads must be an integer"),
        (lambda c: c["quantizer_config"].__setitem__("codebook_size", 1000), r"power of two"),
        (lambda c: c["quantizer_config"].__setitem__("codebook_size", 8192), r"output_dim 12 != log2"),
    ],
    ids=["unknown-key", "unknown-part", "bad-name", "missing-name", "bad-type", "not-pow2", "dim-mismatch"],
)
def test_config_errors(tmp_path, data_dir, fn, match):
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    edit_config(d, fn)
    with pytest.raises(ConfigError, match=match):
        fastfocal.load(d, device="cpu")


def test_malformed_json(tmp_path, data_dir):
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        fastfocal.load(d, device="cpu")


def test_missing_files(tmp_path, data_dir):
    with pytest.raises(CheckpointError, match="has no config.json"):
        fastfocal.load(tmp_path, device="cpu")
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.pt"):
        fastfocal.load(d, device="cpu")
    with pytest.raises(CheckpointError, match="neither a directory"):
        fastfocal.load(str(tmp_path / "nope" / "x"), device="cpu")


def test_hub_id_without_hub_client_or_network(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_hub(name, *a, **k):
        if name.startswith("huggingface_hub"):
            raise ImportError("no")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        fastfocal.load("lucadellalib/focalcodec_50hz_4k_causal", device="cpu")


def test_bad_dtype_and_device_choice():
    with pytest.raises(ValueError, match="float16 is supported on GPU only"):
        fastfocal.random_init("50hz_4k_causal", device="cpu", dtype="fp16")
    with pytest.raises(ValueError, match="unknown dtype"):
        fastfocal.random_init("50hz_4k_causal", device="cpu", dtype="int8")


@pytest.mark.parametrize("name", ["50hz_2k_causal", "50hz_4k_causal", "50hz_65k_causal"])
def test_full_size_presets_match_official_tensor_lists(data_dir, name):
    cfg = preset(name)
    with torch.device("meta"):
        model = FocalCodecModel(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {}
    for line in (data_dir / "configs" / f"focalcodec_{name}.tensors.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        k, shape = line.split()
        official[k] = tuple(int(s) for s in shape.split("x"))
    assert ours == official
    assert sum(torch.Size(s).numel() for s in ours.values()) > 200e6


def test_preset_by_hub_id():
    assert preset("lucadellalib/focalcodec_50hz_65k_causal").quantizer.codebook_size == 65536
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("50hz_1k_causal")


def test_random_init_is_deterministic_and_runs(golden_causal, data_dir):
    cfg = CodecConfig.from_dict(json.loads((data_dir / "tiny_causal" / "config.json").read_text()))
    a = fastfocal.random_init(cfg, seed=3, device="cpu")
    b = fastfocal.random_init(cfg, seed=3, device="cpu")
    c = fastfocal.random_init(cfg, seed=4, device="cpu")
    sig = T(golden_causal["sig"][:1, :6400])
    assert torch.equal(a.sig_to_toks(sig), b.sig_to_toks(sig))
    assert not torch.equal(a.sig_to_sig(sig), c.sig_to_sig(sig))
    assert torch.isfinite(a.sig_to_sig(sig)).all()


def test_config_round_trip(data_dir):
    for name in ("tiny_causal", "tiny_noncausal"):
        raw = json.loads((data_dir / name / "config.json").read_text())
        cfg = CodecConfig.from_dict(raw)
        assert CodecConfig.from_dict(cfg.to_dict()) == cfg
