"""Reduced precision: bfloat16 on CPU agrees with float32 on real speech."""
import pytest
import soundfile as sf
import torch

import fastfocal


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
    assert yb.dtype == torch.bfloat16 and yb.shape == ya.shape
    # decoding the same tokens: bf16 audio within a few percent of fp32 (relative RMS)
    da, db = a.decode(ta), b.decode(ta).float()
    rel = ((da - db).pow(2).mean() / da.pow(2).mean()).sqrt().item()
    assert rel < 0.05, f"bf16 decoder relative RMS error {rel:.3f}"


def test_bf16_streaming_close_to_offline(data_dir, speech):
    c = fastfocal.load(data_dir / "tiny_causal", device="cpu", dtype="bfloat16")
    x = speech[None, : 20 * 1280]
    s = c.stream_encoder()
    toks = torch.cat([s.push(x[:, a:a + 1280]) for a in range(0, x.shape[1], 1280)], 1)
    agree = (toks == c.sig_to_toks(x)).float().mean().item()
    assert agree > 0.9, f"bf16 stream/offline token agreement {agree:.3f}"
