"""Hostile and edge-case use of the public API: each case is a clear error naming the problem,
raised before anything is allocated or any stream state changes."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastfocal
from fastfocal import tactics
from fastfocal import config as config_module
from fastfocal.config import CodecConfig, ConfigError, load_config
from fastfocal.inputs import InputError, resolve_device_dtype
from fastfocal.loading import CheckpointError, build


@pytest.fixture(scope="module")
def causal_cfg_dict(data_dir):
    return json.loads((data_dir / "tiny_causal" / "config.json").read_text())


@pytest.fixture(scope="module")
def noncausal_cfg_dict(data_dir):
    return json.loads((data_dir / "tiny_noncausal" / "config.json").read_text())


@pytest.fixture(scope="module")
def causal_sd(data_dir):
    return load_file(str(data_dir / "tiny_causal" / "model.safetensors"))


def _edit(d, part, key, value):
    d = copy.deepcopy(d)
    d[f"{part}_config"][key] = value
    return d


# --------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("key,value,msg", [
    ("n_fft", 1023, "decoder_config.n_fft must be even, got 1023"),  # was a size mismatch deep in decoding
    ("hop_length", 2048, "hop_length (2048) must be smaller than n_fft (1024)"),  # was 512 samples of garbage
    ("hop_length", 1024, "hop_length (1024) must be smaller than n_fft"),  # zero overlap-add envelope: NaN
])
def test_vocos_fft_sizes_checked(noncausal_cfg_dict, key, value, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        CodecConfig.from_dict(_edit(noncausal_cfg_dict, "decoder", key, value))


@pytest.mark.parametrize("part,key,value", [
    ("encoder", "num_layers", 1 << 24),  # within MAX_SIZE: built ~700 GB of meta modules before any check
    ("decoder", "num_layers", 100_000),
    ("compressor", "focal_level", 1 << 20),
])
def test_layer_counts_limited(causal_cfg_dict, part, key, value):
    limit = config_module.MAX_LAYERS
    with pytest.raises(ConfigError, match=f"{part}_config.{key} is {value}, more than the limit of {limit} layers"):
        CodecConfig.from_dict(_edit(causal_cfg_dict, part, key, value))


def test_layer_list_lengths_limited(causal_cfg_dict):
    d = _edit(causal_cfg_dict, "compressor", "hidden_dims", [32] * 1000)
    d["compressor_config"]["downscale_factors"] = [1] * 1000
    with pytest.raises(ConfigError, match="compressor_config.hidden_dims lists 1000 layers, more than the limit"):
        CodecConfig.from_dict(d)
    limit = config_module.MAX_LAYERS
    ok = _edit(causal_cfg_dict, "decoder", "num_layers", limit)  # the limit itself is fine
    assert CodecConfig.from_dict(ok).decoder.num_layers == limit


def test_huge_config_file_not_read_whole(tmp_path):
    p = tmp_path / "config.json"
    with open(p, "wb") as f:
        try:
            f.truncate(1 << 40)  # sparse: 1 TB that takes no disk; was read whole (MemoryError)
        except OSError:
            pytest.skip("filesystem without sparse files")
    with pytest.raises(ConfigError, match="config.json is larger than 1,048,576 bytes"):
        load_config(p)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_refused_at_load(causal_sd, data_dir, bad):
    cfg = load_config(data_dir / "tiny_causal" / "config.json")
    k = "decoder.head.proj.weight"
    w = causal_sd[k].clone()
    w[3, :5] = bad
    with pytest.raises(CheckpointError, match=rf"NaN or Inf weights in 1 tensor: {k} \(5 of {w.numel()}\)"):
        build(cfg, {**causal_sd, k: w}, "cpu", torch.float32)


def _legacy(sd):
    out = {}
    for k, v in sd.items():
        if "qkv_proj" in k:
            for n, t in zip("qkv", v.chunk(3, 0)):
                out[k.replace("qkv_proj", f"{n}_proj")] = t
        else:
            out[k] = v
    return out


def test_legacy_qkv_checked_before_joining(causal_sd, causal):
    legacy = _legacy(causal_sd)
    k = "encoder.encoder.layers.0.attention.k_proj.weight"
    for bad in (legacy[k][:, :64], legacy[k][:, 0]):  # was a RuntimeError from torch.cat
        with pytest.raises(CheckpointError, match=r"cannot join encoder.encoder.layers.0.attention.q/k/v_proj.weight"):
            build(causal.config, {**legacy, k: bad}, "cpu", torch.float32)
    with pytest.raises(CheckpointError, match=r"have dtypes .*int32.*: weights must be floating point"):
        build(causal.config, {**legacy, k: legacy[k].int()}, "cpu", torch.float32)  # was promoted silently
    # a checkpoint holding both forms keeps its qkv_proj (was overwritten by the q/k/v join)
    q = "encoder.encoder.layers.0.attention.qkv_proj.weight"
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(3\): .*k_proj.weight"):
        build(causal.config, {**legacy, q: causal_sd[q]}, "cpu", torch.float32)


def test_state_dict_names_and_values_checked(causal_sd, causal):
    with pytest.raises(CheckpointError, match="tensor names must be strings, got 1"):
        build(causal.config, {**causal_sd, 1: torch.zeros(1)}, "cpu", torch.float32)  # was AttributeError
    with pytest.raises(CheckpointError, match=r"values must be tensors: compressor.out_proj.bias \(list\)"):
        build(causal.config, {**causal_sd, "compressor.out_proj.bias": [0.0] * 12}, "cpu", torch.float32)


def test_pt_with_int_keys(tmp_path, data_dir, causal_sd):
    (tmp_path / "config.json").write_text((data_dir / "tiny_causal" / "config.json").read_text())
    torch.save({**causal_sd, 7: torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="tensor names must be strings, got 7"):
        fastfocal.load(tmp_path, device="cpu")
    torch.save({"state_dict": dict(causal_sd)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"not a plain name -> tensor state dict \(its keys: 'state_dict'\)"):
        fastfocal.load(tmp_path, device="cpu")


@pytest.mark.parametrize("source", [None, 5, b"tests/data/tiny_causal"])
def test_load_source_type(source):
    with pytest.raises(TypeError, match="model must be a directory, a config.json path or a hub id"):
        fastfocal.load(source, device="cpu")


# --------------------------------------------------------------------------- device / dtype
@pytest.mark.parametrize("device", ["meta", torch.device("meta"), "xpu", "mps"])
def test_device_types_refused(device):
    # meta loaded and then failed at the first call with "Tensor.item() cannot be called on meta tensors"
    with pytest.raises(InputError, match="device must be cpu or cuda, got '(meta|xpu|mps)'"):
        resolve_device_dtype(device, None)


def test_cuda_index_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match="'cuda:3' requested but there is only 1 CUDA device"):
        resolve_device_dtype("cuda:3", "bf16")
    assert resolve_device_dtype("cuda:0", "bf16") == (torch.device("cuda:0"), torch.bfloat16)


# --------------------------------------------------------------------------- inputs
BIG = 1 << 36  # elements: hundreds of GiB dense


@pytest.mark.parametrize("call,make,what", [
    ("toks_to_sig", lambda: torch.zeros(1, 1, dtype=torch.long).expand(1, BIG), "tokens"),
    ("toks_to_codes", lambda: torch.zeros(1, 1, dtype=torch.int32).expand(1, BIG), "tokens"),
    ("sig_to_toks", lambda: np.broadcast_to(np.float32(0), (BIG,)), "audio"),
    ("feats_to_lats", lambda: torch.zeros(1, 1, 128).expand(1, BIG // 128, 128), "features"),
    ("lats_to_toks", lambda: torch.zeros(1, 1, 12).expand(1, BIG // 12, 12), "latents"),
])
def test_broadcast_views_refused_before_copying(causal, call, make, what):
    # each was copied dense by the input checks (np.ascontiguousarray, .long(), aminmax, isfinite)
    # before the memory check: a RuntimeError/MemoryError from the allocator, or a full machine
    with pytest.raises(InputError, match=rf"{what} of shape .* \(a broadcast view of \d+ elements.* is available"):
        getattr(causal, call)(make())


def test_broadcast_view_converted_to_bf16_refused(data_dir):
    bf16 = fastfocal.load(data_dir / "tiny_causal", device="cpu", dtype="bf16")
    # float32 -> bfloat16 made a dense copy of the view before the batch's memory check
    with pytest.raises(InputError, match=r"audio of shape \(1, 68719476736\) \(a broadcast view of 1 elements"):
        bf16.sig_to_toks(torch.zeros(1, 1).expand(1, BIG))
    with pytest.raises(InputError, match=r"a batch of 10000000 x 320 audio needs"):  # float32 keeps the codec's check
        fastfocal.load(data_dir / "tiny_causal", device="cpu").sig_to_toks(torch.zeros(1, 320).expand(10**7, 320))


def test_broadcast_view_push_leaves_stream_unchanged(causal):
    s = causal.stream()
    sig = torch.from_numpy(np.random.default_rng(0).standard_normal(2000).astype(np.float32)) * 0.1
    s.push(sig)
    pos, pending = s.states["encoder"].pos.clone(), s.pending
    with pytest.raises(InputError, match="audio of shape .*broadcast view"):
        s.push(torch.zeros(1, 1).expand(1, BIG))
    assert torch.equal(s.states["encoder"].pos, pos) and s.pending == pending
    small = torch.full((1, 1), 0.01).expand(1, 1280)  # a small broadcast view is fine
    toks, audio = s.push(small)
    assert toks.shape == (1, 4) and audio.shape == (1, 1920)


@pytest.mark.parametrize("call,x", [
    ("sig_to_toks", torch.full((3200,), 0.1).to_sparse()),
    ("toks_to_sig", torch.ones(8, dtype=torch.long).to_sparse()),
    ("feats_to_lats", torch.ones(4, 128).to_sparse()),
])
def test_sparse_inputs_refused(causal, call, x):
    # were NotImplementedError "Could not run 'aten::ne.Scalar' with arguments from the 'SparseCPU' backend"
    with pytest.raises(InputError, match="must be a dense tensor, got layout torch.sparse_coo"):
        getattr(causal, call)(x)


def test_sparse_push_leaves_stream_unchanged(causal):
    s = causal.stream()
    with pytest.raises(InputError, match="audio must be a dense tensor"):  # was "Cannot set version_counter ..."
        s.push(torch.full((3200,), 0.1).to_sparse())
    assert s.pending == 0 and s.states["encoder"].pos.tolist() == [0]


# --------------------------------------------------------------------------- streams
@pytest.mark.parametrize("rows", [[0.5], [1.9], 1.5, torch.tensor([0.7]), [True], "ab"])
def test_reset_rows_must_be_integers(causal, rows):
    s = causal.stream_encoder(batch_size=2)
    s.push(torch.from_numpy(np.random.default_rng(1).standard_normal((2, 1280)).astype(np.float32)) * 0.1)
    before = [t.clone() for t in s.states["encoder"].tensors()]
    # 0.5 / 1.9 / True were truncated to row 0 / 1 / 1 and that row was reset silently
    with pytest.raises(InputError, match="rows must be integer row indices"):
        s.reset(rows)
    assert all(torch.equal(a, b) for a, b in zip(before, s.states["encoder"].tensors()))
    s.reset([])  # nothing to reset is still fine
    s.reset(np.array([1], dtype=np.uint8))
    assert s.states["encoder"].pos.tolist() == [4, 0]


# --------------------------------------------------------------------------- tactics
@pytest.mark.parametrize("fixed", [[], "abc", [1, 2], 3.0])
def test_tactics_not_a_dict(fixed):
    # a tactics file read back as a list or string failed with AttributeError: 'list' has no 'items'
    with pytest.raises(ValueError, match="tactics must be a dict of bucket -> switches, got"):
        tactics.parse_fixed(fixed, [1, 2, 4])


def test_tactics_messages_cut_short():
    with pytest.raises(ValueError, match="is not an integer") as e:
        tactics.parse_fixed({"9" * 5000: {}}, [1, 2])
    assert len(str(e.value)) < 200


def test_engine_tactics_list_is_input_error(causal):
    with pytest.raises(InputError, match="tactics must be a dict"):
        fastfocal.StreamEngine(causal, 2, tactics=[{"pdl": True}])


def test_flush_offline_tail_must_be_a_bool(causal):
    """flush(offline_tail="no") ran the offline tail (any non-empty string is true)."""
    from fastfocal import InputError

    s = causal.stream_encoder()
    s.push(torch.zeros(1, 700))
    for bad in ("no", 0.0, None):
        with pytest.raises(InputError, match="offline_tail must be True or False"):
            s.flush(offline_tail=bad)
    assert s._fill == 700  # refused before anything ran: the partial chunk is still there
    assert s.flush(offline_tail=np.bool_(True)).shape == (1, 3)  # numpy's bool is a bool


def test_output_rate_must_be_whole(noncausal_cfg_dict):
    """An output rate that is not a whole number of Hz (hop_length 500 on 384-sample frames:
    20,833.3 Hz) was rounded down and the audio labelled with the wrong rate; such configs are
    refused at load."""
    d = _edit(noncausal_cfg_dict, "decoder", "hop_length", 500)
    strides = list(d["encoder_config"]["strides"])
    strides[0] = strides[0] * 384 // CodecConfig.from_dict(noncausal_cfg_dict).hop_samples
    d["encoder_config"]["strides"] = strides
    with pytest.raises(ConfigError, match=r"hop_length 500 x 16000 Hz is not a multiple of the encoder's 384"):
        CodecConfig.from_dict(d)
    d["decoder_config"]["hop_length"] = 480  # 20,000 Hz: whole
    assert CodecConfig.from_dict(d).sample_rate_output == 20000
