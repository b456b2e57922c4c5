"""Audio IO and the `fastfocal` command on real speech with the tiny causal model."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from fastfocal.audio import AudioError, read_audio, write_audio
from fastfocal import cli
from fastfocal.cli import main
from fastfocal.version import __version__

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
    ("garbage", "cannot read audio"), ("dir", "is a directory"), ("fifo", "not a regular file"),
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
    elif kind == "fifo":  # opening it would block until a writer came
        os.mkfifo(p)
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
            "model": TINY, "fastfocal_version": __version__, "dtype": "float32", "device": "cpu",
            "weights_hash": causal.model.weights_hash, "sample_rate_input": 16000, "sample_rate_output": 24000, "token_rate": 50.0,
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
    n_params = json.loads((DATA / "tiny_causal" / "info.json").read_text())["num_params"]  # the checkpoint's record
    for want in ("causal:           True", "codebook size:    4096", f"parameters:       {n_params:,}",
                 "sample rate out:  24000 Hz", "token rate:       50 Hz", "chunk size:       1280 samples (80 ms)",
                 "latency:          80 ms"):
        assert want in out, out


def test_f32_dot_flag(capsys, monkeypatch):
    """--f32-dot sets the split-dot mode for the run and, through the environment, its workers;
    a CPU run says its dots stay IEEE, and its provenance records no mode (CPU ignores it)."""
    import fastfocal
    from fastfocal.loading import open_codec, provenance

    monkeypatch.delenv("FASTFOCAL_F32_DOT", raising=False)
    try:
        assert main(["info", *MODEL, "--f32-dot", "bf16x3"]) == 0
        assert fastfocal.f32_dot() == "bf16x3" and os.environ["FASTFOCAL_F32_DOT"] == "bf16x3"
        assert "float32 dots:     ieee (CPU)" in capsys.readouterr().out
        assert "f32_dot" not in provenance(open_codec(TINY, None, "cpu", "fp32"))
    finally:
        fastfocal.set_f32_dot(None)
    assert main(["info", *MODEL, "--f32-dot", "bf16x4"]) == 2
    assert "invalid choice: 'bf16x4'" in capsys.readouterr().err
    monkeypatch.setenv("FASTFOCAL_F32_DOT", "bf16")
    assert main(["info", *MODEL]) == 2
    one_error_line(capsys, "float32 dot mode 'bf16' (FASTFOCAL_F32_DOT): expected one of ieee, bf16x3")


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
        "text": (["decode", str(d / "text.npy")], "text.npy: not a token file: no valid .npy header"),
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


# ----------------------------------------------------------------------------- token files (issues 8.6, 9.4)
def test_not_a_token_file(tmp_path, capsys):
    (tmp_path / "notes.txt.npy").write_text("shopping list: eggs\n")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name, match in [("notes.txt.npy", "notes.txt.npy: not a token file: no valid .npy header"),
                        ("obj.npy", "obj.npy: tokens must be an integer array, got object")]:
        assert main(["decode", str(tmp_path / name), "--out", str(tmp_path / "o"), *MODEL]) == 2
        line = one_error_line(capsys, match)
        assert "pickle" not in line


def test_npy_header_checked_before_loading(tmp_path, capsys):
    p = tmp_path / "huge.npy"
    with open(p, "wb") as f:  # a header declaring 1e13 uint16 tokens, then a few bytes
        np.lib.format.write_array_header_1_0(f, {"descr": "<u2", "fortran_order": False, "shape": (10**13,)})
        f.write(b"\0" * 64)
    assert main(["decode", str(p), "--out", str(tmp_path / "o"), *MODEL]) == 2
    one_error_line(capsys, "huge.npy: corrupt or truncated token file: its header declares shape (10000000000000,) "
                           "(20,000,000,000,000 bytes), the file holds 64")
    np.save(tmp_path / "cut.npy", np.arange(1000, dtype=np.uint16))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:-10])
    assert main(["decode", str(tmp_path / "cut.npy"), "--out", str(tmp_path / "o"), *MODEL]) == 2
    one_error_line(capsys, "(2,000 bytes), the file holds 1,990")


@pytest.mark.parametrize("side, match", [
    ({"codebook_size": "4096"}, "cb.json: sidecar codebook_size must be an integer, got '4096'"),
    ({"model": 7}, "cb.json: sidecar model must be a string, got 7"),
    ([1, 2], "cb.json: sidecar must be a JSON object"),
])
def test_bad_sidecar(tmp_path, capsys, side, match):
    np.save(tmp_path / "cb.npy", np.array([1, 2, 3], np.uint16))
    (tmp_path / "cb.json").write_text(json.dumps(side))
    assert main(["decode", str(tmp_path / "cb.npy"), "--out", str(tmp_path / "o"), *MODEL]) == 2
    line = one_error_line(capsys, match)
    assert "4096-token codebook" not in line


# ----------------------------------------------------------------------------- audio files (issues 9.1, 9.4)
def _truncated_wavs(d: Path) -> dict:
    x = read_audio(WAV16)
    sf.write(d / "full.wav", x, 16000, subtype="PCM_16")
    raw = (d / "full.wav").read_bytes()
    (d / "cut.wav").write_bytes(raw[:len(raw) // 2])  # header says 66,880 data bytes, ~half present
    i = raw.index(b"data")
    (d / "huge.wav").write_bytes(raw[:i + 4] + (0xFFFFFFF0).to_bytes(4, "little") + raw[i + 8:])  # header: 4 GB
    return {"cut.wav": "corrupt or truncated audio file: the header says data: 66,880 bytes, the file holds 33,418",
            "huge.wav": "corrupt or truncated audio file: the header says data: 4,294,967,280 bytes"}


@pytest.mark.parametrize("cmd", ["encode", "roundtrip"])
def test_truncated_wav_is_corrupt(tmp_path, capsys, cmd):
    for name, match in _truncated_wavs(tmp_path).items():
        assert main([cmd, str(tmp_path / name), "--out", str(tmp_path / "o"), *MODEL]) == 2
        one_error_line(capsys, f"{tmp_path / name}: {match}")
    assert main([cmd, str(tmp_path / "full.wav"), "--out", str(tmp_path / "o"), *MODEL]) == 0


@pytest.mark.parametrize("cmd", ["encode", "roundtrip"])
def test_out_of_range_audio_names_the_file(tmp_path, capsys, causal, cmd):
    x = read_audio(WAV16)
    loud = x.copy()
    loud[5000] = 1e30
    sf.write(tmp_path / "loud.wav", loud, 16000, subtype="FLOAT")
    sf.write(tmp_path / "clipped.wav", np.clip(x * 40, -1.5, 1.5), 16000, subtype="FLOAT")  # over-driven: fine
    argv = [cmd, str(tmp_path / "loud.wav"), str(tmp_path / "clipped.wav"), "--out", str(tmp_path / "o"), *MODEL]
    assert main(argv) == 2
    one_error_line(capsys, f"{tmp_path / 'loud.wav'}: audio has samples of magnitude 1e+30: float PCM must be within ±8")
    assert not (tmp_path / "o" / ("loud.npy" if cmd == "encode" else "loud.wav")).exists()
    assert (tmp_path / "o" / ("clipped.npy" if cmd == "encode" else "clipped.wav")).exists()


def test_model_overflow_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from fastfocal.codec import Codec
    from fastfocal.pipeline import NumericsError

    def overflow(self, sig):
        raise NumericsError("the model produced NaN/Inf from audio: try float32")

    monkeypatch.setattr(Codec, "sig_to_toks", overflow)
    assert main(["encode", WAV16, "--out", str(tmp_path / "o"), *MODEL]) == 2
    one_error_line(capsys, f"{WAV16}: the model produced NaN/Inf")


# ----------------------------------------------------------------------------- provenance (issue 8.7)
def test_decode_uses_the_sidecar_model_and_checks_weights(tmp_path, capsys, causal):
    import shutil

    from safetensors.torch import load_file, save_file

    assert main(["encode", WAV16, "--out", str(tmp_path / "t"), *MODEL]) == 0
    npy = tmp_path / "t" / "84-121123-0000.npy"
    want = causal.toks_to_sig(np.load(npy).astype(np.int64)).numpy()
    # no --model: the sidecar's model (the tiny checkpoint), not the hub default
    assert main(["decode", str(npy), "--out", str(tmp_path / "w"), "--device", "cpu", "--float"]) == 0
    np.testing.assert_array_equal(sf.read(tmp_path / "w" / "84-121123-0000.wav", dtype="float32")[0], want)
    # another checkpoint with the same codebook: refused, unless --force
    other = tmp_path / "other"
    shutil.copytree(TINY, other)
    sd = load_file(str(other / "model.safetensors"))
    sd["decoder.head.proj.bias"] = sd["decoder.head.proj.bias"] + 0.01
    save_file(sd, str(other / "model.safetensors"))
    capsys.readouterr()
    argv = ["decode", str(npy), "--out", str(tmp_path / "w2"), "--model", str(other), "--device", "cpu"]
    assert main(argv) == 2
    one_error_line(capsys, f"{npy}: made by other weights ({TINY!r}, weights {causal.model.weights_hash[:12]}) than "
                           f"{str(other)!r}")
    assert not (tmp_path / "w2" / "84-121123-0000.wav").exists()
    assert main(argv + ["--force"]) == 0
    assert (tmp_path / "w2" / "84-121123-0000.wav").exists()
    # random weights are named and rebuilt the same way
    assert main(["encode", WAV16, "--out", str(tmp_path / "r"), "--random-init", TINY, "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "r" / "84-121123-0000.json").read_text())
    assert meta["model"] == f"random:{TINY}" and meta["weights_hash"] != causal.model.weights_hash
    assert main(["decode", str(tmp_path / "r" / "84-121123-0000.npy"), "--out", str(tmp_path / "rw"), "--device", "cpu"]) == 0
    assert main(["decode", str(tmp_path / "r" / "84-121123-0000.npy"), "--out", str(tmp_path / "rw"), *MODEL]) == 2
    one_error_line(capsys, "made by other weights")


# ----------------------------------------------------------------------------- progress (issue 8.9)
@pytest.mark.parametrize("case", ["files", "tail-flips"])
def test_long_encode_streams_in_pieces_with_exact_tokens(tmp_path, monkeypatch, causal, golden_causal, case):
    """Pushes of PIECE_SECONDS and an offline tail: sig_to_toks's tokens. tail-flips: a length
    where the streaming rule's zero-padded last chunk changes a token (checked here), so a plain
    flush would fail it."""
    if case == "files":
        x = np.concatenate([read_audio(WAV16), read_audio(WAV48), read_audio(WAV16)[::-1].copy()])
    else:
        x = golden_causal["sig"][0, :16236].astype(np.float32)
        s = causal.stream_encoder(1)
        plain = torch.cat([s.push(torch.from_numpy(x)[None]), s.flush()], 1)[0]
        assert not torch.equal(plain, causal.sig_to_toks(x))
    sf.write(tmp_path / "long.wav", x, 16000, subtype="FLOAT")
    monkeypatch.setattr(cli, "PIECE_SECONDS", 1)
    pushes = []
    real = cli.Codec.stream_encoder

    def counting(self, *a, **k):
        enc = real(self, *a, **k)
        push = enc.push
        enc.push = lambda s: (pushes.append(len(s)), push(s))[1]
        return enc

    monkeypatch.setattr(cli.Codec, "stream_encoder", counting)
    assert main(["encode", str(tmp_path / "long.wav"), "--out", str(tmp_path / "o"), *MODEL]) == 0
    assert pushes == [16000] * (len(x) // 16000) + [len(x) % 16000]
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "long.npy"), causal.sig_to_toks(x).numpy())


def test_progress_bar_on_a_terminal_only(tmp_path):
    import fcntl
    import pty
    import select
    import struct
    import termios

    x = np.concatenate([read_audio(WAV16), read_audio(WAV48)] * 6)  # 33 s: over one 30 s piece
    sf.write(tmp_path / "long.wav", x, 16000, subtype="FLOAT")

    def stderr_on_tty(*extra) -> str:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal's size
        p = subprocess.Popen([sys.executable, "-m", "fastfocal", "encode", str(tmp_path / "long.wav"), "--out",
                              str(tmp_path / "o"), *MODEL, *extra], stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        out = b""
        while True:
            r, _, _ = select.select([master], [], [], 120)
            if not r:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
        assert p.wait(timeout=120) == 0
        return out.decode(errors="replace")

    bar = stderr_on_tty()
    assert "audio-s" in bar and "long.wav" in bar, bar
    assert stderr_on_tty("--quiet") == ""


# ----------------------------------------------------------------------------- sample rates and memory (review F2, F3)
def test_sample_rates_outside_the_codec_range_are_refused(tmp_path, capsys):
    """A 1 Hz header made read_audio resample 16,000x (a 2 MB WAV asked for 60 GiB); 2 GHz gave
    a message about frames, not the rate."""
    x = (np.random.RandomState(0).randn(1000) * 0.1).astype(np.float32)
    for name, sr, shown in (("sr1.wav", 1, "1 Hz"), ("sr999.wav", 999, "999 Hz"),
                            ("sr2g.wav", 2_000_000_000, "2,000,000,000 Hz")):
        sf.write(tmp_path / name, x, sr, subtype="PCM_16")
        match = f"{tmp_path / name}: sample rate {shown} is outside the 1,000-384,000 Hz fastfocal reads"
        with pytest.raises(AudioError) as e:
            read_audio(tmp_path / name)
        assert str(e.value) == match
        assert main(["encode", str(tmp_path / name), "--out", str(tmp_path / "o"), *MODEL]) == 2
        one_error_line(capsys, match)
    sf.write(tmp_path / "sr1000.wav", x, 1000, subtype="FLOAT")  # the lowest rate taken
    np.testing.assert_array_equal(read_audio(tmp_path / "sr1000.wav"), soxr.resample(x, 1000, 16000, quality="HQ"))


def test_resampled_size_is_checked_against_memory_first(monkeypatch):
    import fastfocal.audio as audio
    from fastfocal import inputs

    frames = sf.info(WAV48).frames
    monkeypatch.setattr(inputs, "available_bytes", lambda device: 1 << 16)
    monkeypatch.setattr(audio.soxr, "ResampleStream", lambda *a, **k: pytest.fail("resampled before the check"))
    with pytest.raises(AudioError) as e:
        read_audio(WAV48)
    need = 2 * 4 * -(-frames * 16000 // 48000)
    assert str(e.value) == (f"{WAV48}: {frames:,} frames at 48,000 Hz, as 16,000 Hz audio, needs {need / 2**20:.3g} MiB "
                            "but only 0.0625 MiB is available on cpu: split the file or free memory")


def test_decode_counts_the_output_audio_before_running(tmp_path, capsys, causal, monkeypatch):
    """3M valid tokens passed a 16 MiB check and then needed 5.4 GB of output audio: the check
    now counts it (480 float32 samples a token, held whole), so the file is refused up front."""
    import torch

    from fastfocal import codec as codec_mod
    from fastfocal import inputs
    from fastfocal.pipeline import Pipeline

    T = 20000
    npy = tmp_path / "long.npy"
    np.save(npy, np.random.RandomState(0).randint(0, 4096, T).astype(np.uint16))
    state_and_activations = (Pipeline.bytes_per_slot(causal.model, ("decompressor", "decoder"), torch.float32)
                             + Pipeline.activation_bytes_for(causal.config, torch.float32, 1, T))
    monkeypatch.setattr(inputs, "available_bytes", lambda device: state_and_activations + T * 480)  # < the audio
    monkeypatch.setattr(codec_mod, "run_offline", lambda *a, **k: pytest.fail("decoded before the memory check"))
    assert main(["decode", str(npy), "--out", str(tmp_path / "o"), *MODEL]) == 2
    line = one_error_line(capsys, f"{npy}: a batch of 1 x {T} tokens needs ")
    assert line.endswith("is available on cpu: use a smaller batch or split the input")
    assert not (tmp_path / "o" / "long.wav").exists()


# ----------------------------------------------------------------------------- outputs (review F4)
def test_decode_never_replaces_a_file_it_did_not_write(tmp_path, capsys, monkeypatch):
    """`encode x.wav` then `decode x.npy` (both --out .) wrote the reconstruction over the
    recording. A file the command did not write is refused unless --overwrite; its own earlier
    output (tagged in the WAV's INFO chunk) is replaced, so reruns work."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(WAV48, "p287_007.wav")
    original = Path("p287_007.wav").read_bytes()
    assert main(["encode", "p287_007.wav", *MODEL]) == 0
    capsys.readouterr()
    assert main(["decode", "p287_007.npy", *MODEL]) == 2
    one_error_line(capsys, "p287_007.npy: output p287_007.wav exists and is not from an earlier `fastfocal decode`; "
                           "pass --overwrite to replace it, or --out DIR")
    assert Path("p287_007.wav").read_bytes() == original
    for _ in range(2):  # the second run replaces the first one's output
        assert main(["decode", "p287_007.npy", "--out", "rec", *MODEL]) == 0
    assert sf.info("rec/p287_007.wav").samplerate == 24000
    capsys.readouterr()
    assert main(["roundtrip", "p287_007.wav", "--out", "rec", *MODEL]) == 2  # decode's output is not roundtrip's
    one_error_line(capsys, "output rec/p287_007.wav exists and is not from an earlier `fastfocal roundtrip`")
    assert main(["decode", "p287_007.npy", "--overwrite", *MODEL]) == 0
    assert sf.info("p287_007.wav").samplerate == 24000


def test_encode_never_replaces_files_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    notes = out / "84-121123-0000.json"
    notes.write_text('{"my": "notes"}')
    assert main(["encode", WAV16, "--out", str(out), *MODEL]) == 2
    one_error_line(capsys, f"output {notes} exists and is not from an earlier `fastfocal encode`; pass --overwrite")
    assert notes.read_text() == '{"my": "notes"}' and not (out / "84-121123-0000.npy").exists()
    np.save(out / "p287_007.npy", np.arange(3))  # someone's array, no sidecar
    assert main(["encode", WAV48, "--out", str(out), *MODEL]) == 2
    one_error_line(capsys, f"output {out / 'p287_007.npy'} exists and is not from an earlier `fastfocal encode`")
    np.testing.assert_array_equal(np.load(out / "p287_007.npy"), np.arange(3))
    assert main(["encode", WAV16, WAV48, "--out", str(out), "--overwrite", *MODEL]) == 0
    assert main(["encode", WAV16, WAV48, "--out", str(out), *MODEL]) == 0  # its own outputs: rerun is fine
    assert json.loads(notes.read_text())["n_tokens"] == len(np.load(out / "84-121123-0000.npy"))


class _FullDisk(io.FileIO):
    """A file on a disk with room for 100 bytes."""

    def write(self, b):
        super().write(bytes(b)[:100])
        raise OSError(28, "No space left on device")


def _full_disk_open(path, mode="r", *a, **k):
    return _FullDisk(path, "wb") if "w" in mode else open(path, mode, *a, **k)


@pytest.mark.parametrize("cmd", ["encode", "decode", "roundtrip"])
def test_a_full_disk_leaves_no_partial_output(tmp_path, capsys, monkeypatch, cmd):
    """Outputs go to a temporary name and are renamed into place: a failed write leaves the
    earlier output (or none), no 0-byte or cut file, no temp file; the error names the output."""
    out = tmp_path / "o"
    assert main(["encode", WAV16, "--out", str(tmp_path / "t"), *MODEL]) == 0
    src = WAV16 if cmd != "decode" else str(tmp_path / "t" / "84-121123-0000.npy")
    name = out / f"84-121123-0000.{'npy' if cmd == 'encode' else 'wav'}"
    assert main([cmd, src, "--out", str(out), *MODEL]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from fastfocal import files

    monkeypatch.setattr(files, "open", _full_disk_open, raising=False)  # the files the command writes
    capsys.readouterr()
    assert main([cmd, src, "--out", str(out), *MODEL]) == 2
    one_error_line(capsys, f"{src}: cannot write {name}: No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, nothing left behind
    for p in out.iterdir():
        p.unlink()
    assert main([cmd, src, "--out", str(out), *MODEL]) == 2
    assert not list(out.iterdir())


# ----------------------------------------------------------------------------- file names (review F7)
@pytest.mark.skipif(os.name != "posix", reason="file names as bytes")
def test_file_names_that_are_not_utf8(tmp_path, causal):
    """b'caf\\xe9.wav' (Latin-1) made soundfile raise UnicodeEncodeError: a traceback, and the
    next input never ran. Such names read and write like any other."""
    import shutil

    cafe = tmp_path / os.fsdecode(b"caf\xe9.wav")
    shutil.copy(WAV16, cafe)
    shutil.copy(WAV48, tmp_path / "zz.wav")
    assert main(["encode", str(cafe), str(tmp_path / "zz.wav"), "--out", str(tmp_path / "o"), *MODEL]) == 0
    npy = tmp_path / "o" / os.fsdecode(b"caf\xe9.npy")
    np.testing.assert_array_equal(np.load(npy), causal.sig_to_toks(read_audio(WAV16)).numpy())
    assert json.loads(npy.with_suffix(".json").read_text())["source"] == str(cafe)
    assert (tmp_path / "o" / "zz.npy").exists()
    # a stdout that takes strict UTF-8 only: the output's name is printed as its bytes
    r = subprocess.run([sys.executable, "-m", "fastfocal", "decode", str(npy), "--out", str(tmp_path / "w"), *MODEL],
                       capture_output=True, timeout=120, env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"))
    assert r.returncode == 0 and r.stdout == os.fsencode(tmp_path / "w" / os.fsdecode(b"caf\xe9.wav")) + b"\n", r.stderr
    with open(tmp_path / "w" / os.fsdecode(b"caf\xe9.wav"), "rb") as f:  # soundfile takes no such str path
        rec, sr = sf.read(f, dtype="float32")
    assert sr == 24000 and len(rec) == len(np.load(npy)) * 480


def test_a_unicode_error_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    def bad_name(path, *a, **k):
        return os.fsdecode(b"caf\xe9").encode("utf-8")  # what a strict UTF-8 encoder raises

    monkeypatch.setattr(cli, "read_audio", bad_name)
    assert main(["encode", WAV16, WAV48, "--out", str(tmp_path / "o"), *MODEL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": UnicodeEncodeError: ")[0] for line in err] == [f"fastfocal: error: {WAV16}",
                                                                         f"fastfocal: error: {WAV48}"]
    assert "\\udce9" in err[0]  # the character, escaped: the line always prints


def test_closed_stdout_pipe_stops_quietly(data_dir):
    """`fastfocal info | head -1` printed "fastfocal: error: [Errno 32] Broken pipe" and
    exited 2 when the reader went away first; it now stops quietly (141, as cat does)."""
    p = subprocess.Popen([sys.executable, "-m", "fastfocal", "info", "--model", str(data_dir / "tiny_causal")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=120) == 141 and err == "", err
