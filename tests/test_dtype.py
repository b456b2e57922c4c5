"""Reduced precision: bfloat16 on CPU agrees with float32 on real speech; float16 rows that
overflow are recomputed in float32."""
import copy

import pytest
import soundfile as sf
import torch

import fastfocal
from fastfocal.codec import Codec
from fastfocal.pipeline import NumericsError, run_offline


@pytest.fixture(scope="module")
def speech(data_dir):
    x, sr = sf.read(data_dir / "audio" / "84-121123-0000.wav", dtype="float32")
    assert sr == 16000
    return torch.from_numpy(x)


@pytest.mark.parametrize("name", ["tiny_causal", "tiny_noncausal"])
def test_bf16_tokens_agree_with_fp32(data_dir, speech, name):
    a = fastfocal.load(data_dir / name, device="cpu", dtype="float32")
    b = fastfocal.load(data_dir / name, device="cpu", dtype="bfloat16")
    assert next(b.model.parameters()).dtype == torch.bfloat16
    ta, tb = a.sig_to_toks(speech), b.sig_to_toks(speech)
    agree = (ta == tb).float().mean().item()
    assert agree > 0.85, f"bf16 token agreement {agree:.3f}"
    ya, yb = a.sig_to_sig(speech), b.sig_to_sig(speech)
    assert yb.dtype == torch.float32 and yb.shape == ya.shape  # audio out is float32 whatever the compute dtype
    # decoding the same tokens: bf16 audio within a few percent of fp32 (relative RMS)
    da, db = a.decode(ta), b.decode(ta)
    assert db.dtype == torch.float32
    rel = ((da - db).pow(2).mean() / da.pow(2).mean()).sqrt().item()
    assert rel < 0.05, f"bf16 decoder relative RMS error {rel:.3f}"


def test_bf16_streaming_close_to_offline(data_dir, speech):
    c = fastfocal.load(data_dir / "tiny_causal", device="cpu", dtype="bfloat16")
    x = speech[None, : 20 * 1280]
    s = c.stream_encoder()
    toks = torch.cat([s.push(x[:, a:a + 1280]) for a in range(0, x.shape[1], 1280)], 1)
    agree = (toks == c.sig_to_toks(x)).float().mean().item()
    assert agree > 0.9, f"bf16 stream/offline token agreement {agree:.3f}"


@pytest.mark.parametrize("name", ["tiny_causal", "tiny_noncausal"])
def test_bf16_cpu_never_calls_a_grouped_conv_in_bf16(data_dir, speech, name, monkeypatch):
    """oneDNN's grouped/depthwise bf16 conv is garbage on AMX CPUs (not reproducible on AMD CI):
    assert the calls instead of the numbers."""
    import torch.nn.functional as F

    real, calls = F.conv1d, []

    def spy(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        calls.append((x.device.type, x.dtype, groups))
        return real(x, w, b, stride, padding, dilation, groups)

    monkeypatch.setattr(F, "conv1d", spy)
    c = fastfocal.load(data_dir / name, device="cpu", dtype="bfloat16")
    x = speech[: 16000 * 3]
    c.sig_to_sig(x)  # offline: 150 frames, so the positional conv takes the library path
    if c.causal:
        s = c.stream()
        s.push(x[: 1280 * 3])
        s.flush()
    grouped = [k for k in calls if k[2] > 1]
    assert grouped, "the spy saw no grouped conv at all: the test would pass vacuously"
    bad = [k for k in grouped if k[1] in (torch.bfloat16, torch.float16)]
    assert not bad, f"grouped conv called in reduced precision on CPU: {bad[:3]}"


def _overflowing(codec):
    """The model with its first conv's weights x1e5: the LayerNorm after that conv makes
    float32 outputs (almost) the same, but loud audio now overflows float16 there."""
    m = copy.deepcopy(codec.model)
    with torch.no_grad():
        m.encoder.feature_extractor.layers[0].conv.weight.mul_(1e5)
    return m


def test_fp16_rows_that_overflow_are_recomputed_in_fp32(causal, speech, caplog, monkeypatch):
    m = _overflowing(causal)
    # float16 on CPU only here (the loaders refuse it there: slow); the guard is device-blind
    half = Codec(copy.deepcopy(m).half(), "half")
    wide = Codec(copy.deepcopy(m).half().float(), "wide")  # the same fp16 weights, fp32 compute
    n = 8 * 1280
    other = speech[n:2 * n] * (0.9 / speech[n:2 * n].abs().max())
    x = torch.stack([speech[:n], speech[:n] * 1e-3, other])  # the quiet row does not overflow
    raw = run_offline(half.model, ("encoder", "compressor"), x.half(), ["toks"])["err"]
    assert raw.tolist() == [3, 0, 3]  # without the guard: NaN tokens on the loud rows
    with caplog.at_level("WARNING", logger="fastfocal"):
        toks = half.sig_to_toks(x)
    assert half.fp32_rows == 2 and "rows [0, 2]" in caplog.text
    for i in (0, 2):
        assert torch.equal(toks[i], wide.sig_to_toks(x[i].half().float()))
    assert torch.equal(toks[1], half.sig_to_toks(x[1]))  # stays on the float16 path
    assert half.fp32_rows == 2
    # the float32 model itself is the reference the recomputed rows approach
    assert (toks[0] == Codec(m).sig_to_toks(x[0])).float().mean() > 0.9
    # other outputs: features in the codec's dtype, audio in float32
    f = half.sig_to_feats(x)
    assert f.dtype == torch.float16  # fp32 batch of 2 vs alone: last-bit differences before rounding to fp16
    torch.testing.assert_close(f[2].float(), wide.sig_to_feats(x[2].half().float()), rtol=1e-3, atol=1e-3)
    y = half.sig_to_sig(x[:1])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, wide.sig_to_sig(x[:1].half().float()), rtol=0, atol=1e-5)
    # little free memory: the float32 rows run one at a time, with the same tokens
    import fastfocal.codec as codec_mod

    monkeypatch.setattr(codec_mod, "available_bytes", lambda device: 1)
    before = half.fp32_rows
    assert torch.equal(half.sig_to_toks(x), toks) and half.fp32_rows == before + 2


def test_fp16_output_beyond_its_range_stays_an_error(causal, speech):
    # features that need float32's range cannot be returned in float16 even after recomputing
    m = copy.deepcopy(causal.model)
    with torch.no_grad():
        m.encoder.feature_extractor.layers[0].conv.weight.mul_(1e5)
        ff = m.encoder.encoder.layers[-1].feed_forward.out_proj
        ff.weight.mul_(1e6)
        ff.bias.add_(1e6)
    half = Codec(copy.deepcopy(m).half(), "half")
    with pytest.raises(NumericsError, match="NaN/Inf from audio"):
        half.sig_to_feats(speech[:8 * 1280])
    assert half.fp32_rows == 1


def test_float32_overflow_does_not_blame_precision(data_dir):
    """A float32 model whose output overflows said "reduced precision overflowed ... try float32"
    (it is float32): the message now names the input's values or the weights."""
    codec = fastfocal.load(data_dir / "tiny_causal", device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in codec.model.decoder.parameters():
            if p.dim() == 2:
                p.mul_(1e20)  # weights far out of range: the decoder's output overflows
    toks = torch.randint(0, codec.codebook_size, (1, 20), generator=torch.Generator().manual_seed(0))
    for run in (lambda: codec.toks_to_sig(toks), lambda: codec.stream_decoder().push(toks)):
        with pytest.raises(NumericsError, match="in float32: the input's values are out of the model's range") as e:
            run()
        assert "try float32" not in str(e.value)
