"""Audio IO and the `fastfocal` command on real speech with the tiny causal model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from fastfocal.audio import AudioError, read_audio, write_audio
from fastfocal.cli import main

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "tiny_causal")
WAV16 = str(DATA / "audio" / "84-121123-0000.wav")  # 16 kHz float
WAV48 = str(DATA / "audio" / "p287_007.wav")  # 48 kHz PCM16
MODEL = ["--model", TINY, "--device", "cpu"]


def one_error_line(capsys, match: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("fastfocal: error: ") and match in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- audio IO
def test_read_audio_resamples_and_mixes_down(tmp_path):
    x48, sr = sf.read(WAV48, dtype="float32")
    assert sr == 48000
    got = read_audio(WAV48)
    assert got.dtype == np.float32 and got.ndim == 1
    np.testing.assert_array_equal(got, soxr.resample(x48, 48000, 16000, quality="HQ"))
    # stereo with different channels: the mean, resampled
    x16 = read_audio(WAV16)
    stereo = np.stack([x16, -0.5 * x16[::-1]], 1)
    sf.write(tmp_path / "st.wav", stereo, 22050, subtype="FLOAT")
    want = soxr.resample(stereo.mean(1).astype(np.float32), 22050, 16000, quality="HQ")
    np.testing.assert_allclose(read_audio(tmp_path / "st.wav"), want, atol=1e-6)
    np.testing.assert_array_equal(read_audio(WAV16), sf.read(WAV16, dtype="float32")[0])  # 16 kHz: as stored


def test_write_audio(tmp_path):
    sig = read_audio(WAV16)[:5000] * 3  # some samples beyond [-1, 1]
    write_audio(tmp_path / "f.wav", sig, 24000, "FLOAT")
    write_audio(tmp_path / "p.wav", sig, 24000)
    f, sr = sf.read(tmp_path / "f.wav", dtype="float32")
    assert sr == 24000 and sf.info(tmp_path / "f.wav").subtype == "FLOAT"
    np.testing.assert_array_equal(f, sig)
    p, _ = sf.read(tmp_path / "p.wav", dtype="float32")
    assert sf.info(tmp_path / "p.wav").subtype == "PCM_16"
    np.testing.assert_allclose(p, np.clip(sig, -1, 1), atol=1.0 / 32767)


@pytest.mark.parametrize("kind, match", [
    ("missing", "no such file"), ("empty", "contains no samples"), ("nan", "NaN or Inf"),
    ("garbage", "cannot read audio"), ("dir", "is a directory"),
])
def test_read_audio_errors(tmp_path, kind, match):
    p = tmp_path / f"{kind}.wav"
    if kind == "empty":
        sf.write(p, np.zeros(0, np.float32), 16000)
    elif kind == "nan":
        sf.write(p, np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT")
    elif kind == "garbage":
        p.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    elif kind == "dir":
        p.mkdir()
    with pytest.raises(AudioError, match=match) as e:
        read_audio(p)
    assert str(p) in str(e.value)


# ----------------------------------------------------------------------------- commands
def test_encode_decode_real_audio(tmp_path, causal, capsys):
    assert main(["encode", WAV16, WAV48, "--out", str(tmp_path / "tok"), *MODEL]) == 0
    for src in (WAV16, WAV48):
        stem = Path(src).stem
        toks = np.load(tmp_path / "tok" / f"{stem}.npy")
        sig = read_audio(src)
        assert toks.dtype == np.uint16
        np.testing.assert_array_equal(toks, causal.sig_to_toks(sig).numpy())
        meta = json.loads((tmp_path / "tok" / f"{stem}.json").read_text())
        assert meta == {
            "model": TINY, "sample_rate_input": 16000, "sample_rate_output": 24000, "token_rate": 50.0,
            "codebook_size": 4096, "n_tokens": len(toks), "duration_s": len(sig) / 16000,
            "source": os.path.abspath(src),
        }
        assert len(toks) == -(-len(sig) // 320)
    # 48 kHz input is resampled: about a third of the file's samples
    assert abs(json.loads((tmp_path / "tok" / "p287_007.json").read_text())["duration_s"] - sf.info(WAV48).duration) < 1e-3

    npy = tmp_path / "tok" / "p287_007.npy"
    assert main(["decode", str(npy), "--out", str(tmp_path / "wav"), *MODEL]) == 0
    assert capsys.readouterr().out.split()[-1] == str(tmp_path / "wav" / "p287_007.wav")
    rec, sr = sf.read(tmp_path / "wav" / "p287_007.wav", dtype="float32")
    toks = np.load(npy)
    assert sr == 24000 and rec.shape == (len(toks) * 480,)
    want = causal.toks_to_sig(toks.astype(np.int64)).numpy()
    np.testing.assert_allclose(rec, want, atol=1.0 / 32767)  # PCM16 quantisation
    assert np.abs(want).max() > 1e-3  # a real signal, not silence


def test_roundtrip_and_info(tmp_path, causal, capsys):
    assert main(["roundtrip", WAV48, "--out", str(tmp_path), "--float", *MODEL]) == 0
    rec, sr = sf.read(tmp_path / "p287_007.wav", dtype="float32")
    sig = read_audio(WAV48)
    assert sr == 24000 and rec.shape == (int(len(sig) * 1.5),)
    np.testing.assert_allclose(rec, causal.sig_to_sig(sig).numpy(), atol=1e-6)
    # the output would replace the input file: refused
    sf.write(tmp_path / "x.wav", sig, 16000)
    capsys.readouterr()
    assert main(["roundtrip", str(tmp_path / "x.wav"), "--out", str(tmp_path), *MODEL]) == 2
    one_error_line(capsys, "would overwrite the input")
    assert main(["info", *MODEL]) == 0
    out = capsys.readouterr().out
    for want in ("causal:           True", "codebook size:    4096", "parameters:       1,727,778",
                 "sample rate out:  24000 Hz", "token rate:       50 Hz", "chunk size:       1280 samples (80 ms)",
                 "latency:          80 ms"):
        assert want in out, out


def _bad_inputs(d: Path) -> dict:
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(d / "nan.wav", np.array([0.1, np.inf, 0.2] * 100, np.float32), 16000, subtype="FLOAT")
    np.save(d / "range.npy", np.array([1, 2, 4096], np.uint16))
    np.save(d / "shape.npy", np.zeros((2, 5), np.uint16))
    np.save(d / "float.npy", np.zeros(5, np.float32))
    (d / "text.npy").write_text("not numpy")
    np.save(d / "cb.npy", np.array([1, 2, 3], np.uint16))
    (d / "cb.json").write_text(json.dumps({"codebook_size": 65536, "model": "other"}))
    return {
        "missing": (["encode", str(d / "nope.wav")], "nope.wav: no such file"),
        "empty": (["encode", str(d / "empty.wav")], "empty.wav: contains no samples"),
        "nan": (["encode", str(d / "nan.wav")], "nan.wav: contains NaN or Inf samples"),
        "range": (["decode", str(d / "range.npy")], "token out of range [0, 4096): found values in [1, 4096]"),
        "shape": (["decode", str(d / "shape.npy")], "tokens must have shape (T,), got (2, 5)"),
        "float": (["decode", str(d / "float.npy")], "must be an integer array"),
        "text": (["decode", str(d / "text.npy")], "not a readable .npy token file"),
        "codebook": (["decode", str(d / "cb.npy")], "encoded with a 65536-token codebook"),
        "nomodel": (["info", "--model", str(d / "no_such_model")], "neither a directory, a config.json nor a hub id"),
        "config": (["info", "--model", str(d / "cb.json")], "cb.json"),
        "fp16cpu": (["info", "--model", TINY, "--device", "cpu", "--dtype", "fp16"], "float16 is supported on GPU only"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "nan", "range", "shape", "float", "text", "codebook",
                                  "nomodel", "config", "fp16cpu"])
def test_user_errors_one_line(tmp_path, capsys, case):
    argv, match = _bad_inputs(tmp_path)[case]
    if argv[0] != "info":
        argv = argv + ["--out", str(tmp_path / "o"), *MODEL]
    assert main(argv) == 2
    one_error_line(capsys, match)


def test_multi_file_encode_goes_on(tmp_path, capsys, causal):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    argv = ["encode", str(tmp_path / "empty.wav"), WAV16, "--out", str(tmp_path / "o"), *MODEL]
    assert main(argv) == 2
    one_error_line(capsys, "contains no samples")
    got = np.load(tmp_path / "o" / "84-121123-0000.npy")
    np.testing.assert_array_equal(got, causal.sig_to_toks(read_audio(WAV16)).numpy())
    assert not (tmp_path / "o" / "empty.npy").exists()


def test_subprocess_error_has_no_traceback(tmp_path):
    np.save(tmp_path / "bad.npy", np.array([5000, 1], np.int32))
    r = subprocess.run(
        [sys.executable, "-m", "fastfocal", "decode", str(tmp_path / "bad.npy"), "--out", str(tmp_path), *MODEL],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"fastfocal: error: {tmp_path / 'bad.npy'}: token out of range [0, 4096): found values in [1, 5000]"
    ]
    assert not (tmp_path / "bad.wav").exists()
