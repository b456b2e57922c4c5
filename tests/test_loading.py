"""Loading official checkpoints: formats, legacy names, and clear errors."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastfocal
from fastfocal.config import CodecConfig, ConfigError, preset
from fastfocal.loading import CheckpointError
from fastfocal.model import FocalCodecModel

from helpers import GOLDEN_REL, assert_close

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


def test_properties(causal, noncausal, data_dir):
    assert causal.sample_rate_input == 16000 and causal.sample_rate_output == 24000
    assert causal.chunk_size == 1280 and causal.latency == 80.0 and causal.causal
    assert causal.codebook_size == 4096 and causal.token_rate == 50.0
    assert noncausal.sample_rate_output == 16000 and noncausal.latency is None
    assert noncausal.token_rate == 25.0 and noncausal.codebook_size == 8192
    for codec, name in ((causal, "tiny_causal"), (noncausal, "tiny_noncausal")):  # against the checkpoint's own record
        info = json.loads((data_dir / name / "info.json").read_text())
        assert codec.num_params == info["num_params"], name
        assert (codec.chunk_size, codec.causal, codec.latency, codec.sample_rate_input, codec.sample_rate_output) == \
            (info["chunk_size"], info["causal"], info["latency_ms"], info["sample_rate_input"], info["sample_rate_output"]), name


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
    assert_close("feats", codec.sig_to_feats(T(golden_causal["sig"])), golden_causal["feats"], rel=GOLDEN_REL)


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


# ----------------------------------------------------------------------------- config validation (issue 9.3)
@pytest.mark.parametrize(
    "part, key, value, match",
    [
        ("encoder", "num_heads", 0, r"encoder_config.num_heads must be >= 1, got 0"),
        ("encoder", "conv_pos_groups", 0, r"encoder_config.conv_pos_groups must be >= 1"),
        ("encoder", "strides", [5, 2, 2, 0, 2, 2, 2], r"encoder_config.strides must be >= 1"),
        ("encoder", "kernel_sizes", [10, 3, 3, -3, 3, 2, 2], r"encoder_config.kernel_sizes must be >= 1"),
        ("encoder", "dim", -128, r"encoder_config.dim must be >= 1"),
        ("encoder", "window_size", 0, r"encoder_config.window_size must be >= 1"),
        ("encoder", "window_size", 10**7, r"encoder_config.window_size is 10000000, larger than the limit 65536"),
        ("encoder", "ffn_dim", 10**12, r"encoder_config.ffn_dim is 1000000000000, larger than the limit"),
        ("encoder", "num_buckets", 2, r"num_buckets must be >= 4"),
        ("compressor", "focal_window", -14, r"compressor_config.focal_window must be >= 1"),
        ("compressor", "hidden_dims", [128, 0, 32], r"compressor_config.hidden_dims must be >= 1"),
        ("decompressor", "last_window_size", 0, r"decompressor_config.last_window_size must be >= 1"),
        ("decompressor", "lookahead_size", -1, r"decompressor_config.lookahead_size must be >= 0"),
        ("decoder", "hop_length", 0, r"decoder_config.hop_length must be >= 1"),
        ("decoder", "kernel_size", -7, r"decoder_config.kernel_size must be >= 1"),
        ("compressor", "tanhscale_init", float("nan"), r"compressor_config.tanhscale_init must be a finite number"),
    ],
)
def test_config_sizes_are_validated(tmp_path, data_dir, capsys, part, key, value, match):
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    edit_config(d, lambda c: c[f"{part}_config"].__setitem__(key, value))
    with pytest.raises(ConfigError, match=match):
        fastfocal.load(d, device="cpu")
    from fastfocal.cli import main

    assert main(["info", "--model", str(d), "--device", "cpu"]) == 2  # one line, exit 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda c: c.__setitem__("encoder_name", ["WavLM"]), r"unsupported encoder_name \['WavLM'\]; expected one of"),
        (lambda c: c.__setitem__("decoder_name", {"WaveNeXt": 1}), r"unsupported decoder_name \{'WaveNeXt': 1\}"),
        (lambda c: c["compressor_config"].update(hidden_dims=[], downscale_factors=[]),
         r"compressor_config.hidden_dims must list at least one layer, got \[\]"),
        (lambda c: c["decompressor_config"].update(hidden_dims=[], upscale_factors=[]),
         r"decompressor_config.hidden_dims must list at least one layer, got \[\]"),
        (lambda c: c["decoder_config"].update(kernel_size=1), r"decoder_config.kernel_size must be >= 2 for a causal model"),
    ],
    ids=["name-list", "name-object", "compressor-empty", "decompressor-empty", "causal-decoder-kernel-1"],
)
def test_config_values_that_would_fail_later_are_refused_at_load(tmp_path, data_dir, capsys, fn, match):
    """Each of these loaded (or failed with a TypeError) and then crashed in the model or at the first
    decode: a ConfigError naming the field, and one CLI line, instead."""
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    edit_config(d, fn)
    with pytest.raises(ConfigError, match=match):
        fastfocal.load(d, device="cpu")
    from fastfocal.cli import main

    assert main(["info", "--model", str(d), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastfocal: error: ") and "Traceback" not in err


def test_decoder_kernel_1_is_a_working_config_when_non_causal(data_dir):
    """A kernel of 1 is a pointwise conv: fine offline (non-causal); only the causal streaming
    rings need one past frame, so only there it is refused."""
    raw = json.loads((data_dir / "tiny_noncausal" / "config.json").read_text())
    raw["decoder_config"]["kernel_size"] = 1
    codec = fastfocal.random_init(CodecConfig.from_dict(raw), device="cpu")
    audio = codec.toks_to_sig(torch.randint(0, 4096, (1, 10)))
    per_token = codec.config.token_hop * codec.sample_rate_output // codec.sample_rate_input
    assert audio.shape == (1, 10 * per_token) and torch.isfinite(audio).all() and audio.abs().max() > 0


def test_config_not_utf8_or_too_deep(tmp_path, data_dir):
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    (d / "config.json").write_bytes(b'{"encoder_name": "WavLM\xff\xfe"}')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        fastfocal.load(d, device="cpu")
    (d / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        fastfocal.load(d, device="cpu")


def test_absurd_model_size_refused_before_allocating(data_dir, monkeypatch):
    from fastfocal.inputs import InputError
    from fastfocal.loading import param_bytes

    raw = preset("50hz_4k_causal").to_dict()
    raw["encoder_config"]["ffn_dim"] = 1 << 24  # within the per-field limit: ~800 GB of weights
    cfg = CodecConfig.from_dict(raw)
    assert param_bytes(cfg) > 700e9
    with pytest.raises(InputError, match=r"random weights for this config .* needs [\d.]+ GiB but only"):
        fastfocal.random_init(cfg, device="cpu")
    # a checkpoint that matches its config but not the device: refused before conversion
    from fastfocal import inputs

    monkeypatch.setattr(inputs, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(InputError, match=r"the model's parameters needs 6.59 MiB but only 1 MiB is available on cpu"):
        fastfocal.load(data_dir / "tiny_causal", device="cpu")


# ----------------------------------------------------------------------------- weights hash (issue 8.7)
def test_weights_hash(tmp_path, data_dir):
    import hashlib

    a = fastfocal.load(data_dir / "tiny_causal", device="cpu")
    b = fastfocal.load(data_dir / "tiny_causal", device="cpu", dtype="bf16")
    assert a.model.weights_hash == b.model.weights_hash  # before the dtype conversion
    sd = load_file(str(data_dir / "tiny_causal" / "model.safetensors"))
    h = hashlib.sha256()  # the documented recipe, spelled with numpy copies
    for k in sorted(sd):
        h.update(f"{k}\0{str(sd[k].dtype).removeprefix('torch.')}\0{tuple(sd[k].shape)}\0".encode())
        h.update(sd[k].numpy().tobytes())
    assert a.model.weights_hash == h.hexdigest()
    # one changed weight changes it; a bf16 checkpoint of the same weights is other weights
    d = copy_model(data_dir / "tiny_causal", tmp_path / "m")
    sd2 = dict(sd)
    sd2["compressor.out_proj.bias"] = sd["compressor.out_proj.bias"].clone()
    sd2["compressor.out_proj.bias"][3] += 1e-3
    save_file(sd2, str(d / "model.safetensors"))
    assert fastfocal.load(d, device="cpu").model.weights_hash != a.model.weights_hash
    save_file({k: v.bfloat16() for k, v in sd.items()}, str(d / "model.safetensors"))
    assert fastfocal.load(d, device="cpu").model.weights_hash not in (a.model.weights_hash, None)
    r0, r1 = (fastfocal.random_init(data_dir / "tiny_causal", seed=s, device="cpu").model.weights_hash for s in (0, 1))
    assert r0 != r1 and r0 == fastfocal.random_init(data_dir / "tiny_causal", device="cpu", dtype="bf16").model.weights_hash


# ----------------------------------------------------------------------------- hub offline (issue 8.8)
def test_hub_cache_first_then_one_request_without_retries(monkeypatch, tmp_path, data_dir):
    import huggingface_hub as hub

    calls = []

    def download(repo_id, filename, local_files_only=False, **kw):
        calls.append(("download", filename, local_files_only))
        if cached.get(filename) and local_files_only:
            return str(cached[filename])
        raise hub.errors.LocalEntryNotFoundError("not cached") if local_files_only else AssertionError("network")

    def metadata(url, timeout=None, **kw):
        calls.append(("metadata", timeout, kw.get("retry_on_errors", False)))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr(hub, "get_hf_file_metadata", metadata)
    cached = {}
    with pytest.raises(CheckpointError, match=r"cannot download 'owner/model' from the hub and it is not in the local "
                                              r"cache \(ConnectionError: \[Errno -2\] Name or service not known\)"):
        fastfocal.load("owner/model", device="cpu")
    from fastfocal.loading import HUB_TIMEOUT

    assert calls == [("download", "config.json", True), ("metadata", HUB_TIMEOUT, False)]  # one try, no retry loop
    assert HUB_TIMEOUT <= 5
    # cached: no network call at all
    calls.clear()
    cached.update({"config.json": data_dir / "tiny_causal" / "config.json",
                   "model.safetensors": data_dir / "tiny_causal" / "model.safetensors"})
    codec = fastfocal.load("owner/model", device="cpu")
    assert calls == [("download", "config.json", True), ("download", "model.safetensors", True)]
    assert codec.codebook_size == 4096 and codec.name == "owner/model"


def test_hub_unreachable_subprocess_has_no_retries(tmp_path):
    import subprocess
    import sys

    # a refused connection stands in for no network, deterministically
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    r = subprocess.run([sys.executable, "-m", "fastfocal", "info", "--device", "cpu"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Retrying" not in r.stderr, r.stderr
    assert lines[0].startswith("fastfocal: error: cannot download 'lucadellalib/focalcodec_50hz_4k_causal' from the hub")
