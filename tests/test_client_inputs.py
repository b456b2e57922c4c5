"""fastfocal.client checks what it is given before anything goes on the wire: the protocol carries
bare samples, so a stereo, integer or NaN array would otherwise be served silently as garbage."""
import socket

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from fastfocal import cli  # noqa: E402
from fastfocal.client import ServerError, check_audio_input, check_token_input, stream  # noqa: E402
from fastfocal.inputs import InputError  # noqa: E402
from test_server import engine_ref, metric, run, serving, speech  # noqa: E402,F401 (speech: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dead_url():
    """A loopback port nobody listens on: reaching the network would be a ServerError there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"ws://127.0.0.1:{port}"


def test_dead_url_is_a_connect_error(dead_url):
    x = np.zeros(1280, np.float32)
    with pytest.raises(ServerError, match="cannot connect"):
        run(stream(dead_url, x, mode="encode"))


def _sig(n=5120):
    return (0.3 * np.sin(np.arange(n) * 0.05)).astype(np.float32)


def _nan():
    x = _sig()
    x[100:200] = np.nan
    return x


def _inf():
    x = _sig()
    x[7] = -np.inf
    return x


def _loud():
    x = _sig()
    x[300] = 12.0
    return x


@pytest.mark.parametrize("fmt", ["f32le", "s16le"])
@pytest.mark.parametrize("make,expect", [
    (lambda: np.stack([_sig(), _sig()], 1), r"audio has 2 channels \(shape \(5120, 2\)\).*mono 16 kHz.*x\.mean\(1\)"),
    (lambda: np.stack([_sig()] * 6, 0), r"audio has 6 channels \(shape \(6, 5120\)\).*mono 16 kHz.*x\.mean\(0\)"),
    (lambda: _sig().reshape(2, 2, -1), r"audio must be mono.*got shape \(2, 2, 1280\)"),
    (lambda: np.float32(0.1), r"audio must be mono.*got shape \(\)"),
    (lambda: np.round(_sig() * 20000).astype(np.int16), r"floating point in \[-1, 1\], got int16.*x / 32768"),
    (lambda: np.zeros(5120, np.int32), r"floating point.*got int32"),
    (lambda: np.zeros(5120, bool), r"floating point.*got bool"),
    (lambda: _sig().astype(np.complex64), r"floating point.*got complex64"),
    (lambda: torch.zeros(5120, dtype=torch.int16), r"floating point.*got int16"),
    (lambda: [[0.1, 0.2], [0.3]], r"audio must be a numeric array, got list"),
    (_nan, r"^audio contains NaN or Inf$"),
    (_inf, r"^audio contains NaN or Inf$"),
    (_loud, r"audio has samples of magnitude 12: float PCM must be within ±8"),
    (lambda: np.round(_sig() * 20000).astype(np.float32), r"magnitude 6e\+03.*integer PCM: x / 32768"),
], ids=["stereo", "6ch-first", "3d", "scalar", "int16", "int32", "bool", "complex", "torch-int16", "ragged",
        "nan", "inf", "loud", "int-as-float"])
def test_bad_audio_refused_before_connecting(dead_url, make, expect, fmt):
    """InputError (not 'cannot connect'): checked before the client touches the network, in either
    wire format (s16le would have cast NaN to 0 and clipped integer PCM to full scale)."""
    with pytest.raises(InputError, match=expect) as e:
        run(stream(dead_url, make(), mode="encode", fmt=fmt))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make,expect", [
    (lambda: np.arange(20, dtype=np.float32), r"tokens must be integer codebook indices, got float32"),
    (lambda: np.arange(20).reshape(2, 10), r"tokens must be 1-D.*got shape \(2, 10\)"),
    (lambda: np.array([3, -1, 2]), r"tokens: token out of range \[0, 65536\): found values in \[-1, 3\]"),
    (lambda: np.array([3, 70000]), r"token out of range \[0, 65536\): found values in \[3, 70000\]"),
    (lambda: np.ones(4, bool), r"integer codebook indices, got bool"),
], ids=["float", "2d", "negative", "over-uint16", "bool"])
def test_bad_tokens_refused_before_connecting(dead_url, make, expect):
    with pytest.raises(InputError, match=expect):
        run(stream(dead_url, make(), mode="decode"))


def test_review_cases_refused_by_a_live_server_client(causal, speech):
    """The reviewer's cases against a real server, which would have served them without a word:
    stereo (interleaved as mono of twice the length), NaN in s16le (cast to 0), int16 PCM in s16le
    (scaled by 32768, clipped). Each is refused with nothing sent; the good stream still works."""
    x = speech[0, :4 * 1280].copy()
    nan = x.copy()
    nan[100:200] = np.nan
    cases = [(np.stack([x, x], 1), "f32le", "2 channels"), (nan, "s16le", "NaN"),
             (np.round(x * 20000).astype(np.int16), "s16le", "got int16")]
    with serving(causal, max_streams=1, modes=("encode",)) as srv:
        for data, fmt, expect in cases:
            with pytest.raises(InputError, match=expect):
                run(stream(srv.url, data, mode="encode", fmt=fmt))
        assert metric(srv, "fastfocal_bytes_in_total") == 0, "nothing was sent"
        assert np.array_equal(run(stream(srv.url, x, mode="encode")).tokens, engine_ref(causal, "encode", x)[0])


def test_tokens_beyond_the_codebook_refused_before_sending(causal):
    """The codebook is known once the server is ready: refused then, with nothing sent."""
    toks = np.array([1, 2, causal.codebook_size, 5])
    with serving(causal, max_streams=1, modes=("decode",)) as srv:
        with pytest.raises(InputError, match=rf"token out of range \[0, {causal.codebook_size}\): "
                                             rf"found values in \[1, {causal.codebook_size}\]"):
            run(stream(srv.url, toks, mode="decode"))
        assert metric(srv, "fastfocal_bytes_in_total") == 0, "nothing was sent"
        assert metric(srv, "fastfocal_errors_total", type="bad_input") == 0


def test_mono_shapes_and_types_accepted(causal, speech):
    """(n,), (n, 1), (1, n), float64, a torch tensor, bf16: all the same mono stream."""
    x = speech[0, :3 * 1280 + 100].copy()
    ref = engine_ref(causal, "encode", x)[0]
    with serving(causal, max_streams=1, modes=("encode",)) as srv:
        for v in (x, x[:, None], x[None, :], x.astype(np.float64), torch.from_numpy(x)):
            assert np.array_equal(run(stream(srv.url, v, mode="encode", message=1000)).tokens, ref)
        bf = torch.from_numpy(x).bfloat16()
        got = run(stream(srv.url, bf, mode="encode")).tokens
        assert np.array_equal(got, engine_ref(causal, "encode", bf.float().numpy())[0])
        over = x * 4  # over-driven but within the project's ±8 rule: accepted, like a file
        assert len(run(stream(srv.url, over, mode="encode")).tokens) == len(ref)


def test_check_helpers_return_what_is_sent():
    x = _sig(10)
    out = check_audio_input(x[:, None].astype(np.float64))
    assert out.dtype == np.float32 and out.shape == (10,) and np.array_equal(out, x)
    assert check_audio_input(np.zeros(0, np.float32)).shape == (0,)  # an empty stream is the protocol's
    t = check_token_input(np.array([[0, 5, 7]], np.uint16), codebook_size=8)
    assert t.dtype == np.int64 and t.tolist() == [0, 5, 7]
    with pytest.raises(InputError, match=r"\[0, 8\): found values in \[0, 8\]"):
        check_token_input([0, 8], codebook_size=8)


def _one_line(capsys, *parts):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fastfocal: error: ") and all(p in lines[0] for p in parts), lines[0]


def test_cli_client_one_line_naming_the_file(causal, tmp_path, capsys, dead_url):
    """A float WAV with a sample at 20x full scale: before, s16le clipped it and streamed it (exit 0)."""
    loud = tmp_path / "loud.wav"
    x = _sig(4000)
    x[123] = 20.0
    sf.write(loud, x, 16000, subtype="FLOAT")
    for fmt in ("s16le", "f32le"):
        assert cli.main(["client", str(loud), "--url", dead_url, "--mode", "encode", "--format", fmt,
                         "--out", str(tmp_path)]) == 2
        _one_line(capsys, str(loud), "audio has samples of magnitude 20")
    toks = tmp_path / "toks.npy"
    np.save(toks, np.array([1, causal.codebook_size + 3], np.uint16))
    with serving(causal, max_streams=1, modes=("decode",)) as srv:
        assert cli.main(["client", str(toks), "--url", srv.url, "--mode", "decode", "--out", str(tmp_path)]) == 2
        assert metric(srv, "fastfocal_bytes_in_total") == 0
    _one_line(capsys, str(toks), f"token out of range [0, {causal.codebook_size})")
    assert not (tmp_path / "loud.npy").exists() and not (tmp_path / "toks.wav").exists()


def test_client_never_replaces_a_file_it_did_not_write(causal, speech, tmp_path, capsys, dead_url):
    """`fastfocal client x.wav --out .` beside the recording would replace it with its
    reconstruction: refused before anything is streamed (a dead URL is never reached), as is an
    existing x.npy; --overwrite replaces them, and the client's own WAV is replaced on a rerun."""
    src = tmp_path / "x.wav"
    sf.write(src, speech[0, :6000], 16000, subtype="FLOAT")
    before = src.read_bytes()
    assert cli.main(["client", str(src), "--url", dead_url, "--out", str(tmp_path)]) == 2
    _one_line(capsys, str(src), "would overwrite the input")
    assert src.read_bytes() == before
    out = tmp_path / "o"
    out.mkdir()
    (out / "x.npy").write_bytes(b"someone's tokens")
    assert cli.main(["client", str(src), "--url", dead_url, "--out", str(out)]) == 2
    _one_line(capsys, "x.npy exists and is not from an earlier `fastfocal client`", "--overwrite")
    with serving(causal, max_streams=1, modes=("full",)) as srv:
        assert cli.main(["client", str(src), "--url", srv.url, "--out", str(out), "--overwrite"]) == 0
        ref_t, _ = engine_ref(causal, "full", speech[0, :6000])
        assert np.array_equal(np.load(out / "x.npy"), ref_t)
        (out / "x.npy").unlink()  # the WAV left is the client's own: a rerun may replace it
        assert cli.main(["client", str(src), "--url", srv.url, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x.npy", "x.wav"]  # no temporary left
