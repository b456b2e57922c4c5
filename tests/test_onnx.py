"""ONNX export of the streaming step: through ONNX Runtime, fp32 tokens equal fastfocal's
streaming tokens from the first chunk, audio and state agree (tiny model, real speech)."""
import numpy as np
import pytest
import torch

from helpers import assert_close, assert_tokens

from fastfocal.audio import read_audio
from fastfocal.cli import main
from fastfocal.onnx import OnnxStream, export, state_names

CHUNK = 1280


def _speech(data_dir, name):
    sig = read_audio(data_dir / "audio" / name, 16000)  # p287_007 is 48 kHz: resampled
    return sig[: len(sig) // CHUNK * CHUNK]  # whole chunks: every one goes through the step


@pytest.fixture(scope="module")
def full_onnx(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("onnx") / "full.onnx"
    assert main(["export-onnx", "--mode", "full", "--model", str(data_dir / "tiny_causal"), "--out", str(out)]) == 0
    return out


def test_full_step_equals_streaming_from_first_chunk(causal, data_dir, full_onnx):
    sig = _speech(data_dir, "84-121123-0000.wav")
    ort_s, ff_s = OnnxStream(full_onnx, threads=1), causal.stream()
    names = state_names(ff_s.states)
    assert [i.name for i in ort_s.state_info] == names
    toks, audio, ref_toks, ref_audio = [], [], [], []
    for a in range(0, len(sig), CHUNK):  # chunk by chunk: chunk 0 is the fresh-state (pos == 0) path
        t, y = ort_s.push(sig[a:a + CHUNK])
        rt, ry = ff_s.push(torch.from_numpy(sig[a:a + CHUNK]))
        assert_tokens(f"toks of chunk {a // CHUNK}", t, rt)
        toks.append(t), audio.append(y), ref_toks.append(rt.numpy()), ref_audio.append(ry.numpy())
    assert len(toks) == len(sig) // CHUNK > 20
    toks, ref_toks = np.concatenate(toks, 1), np.concatenate(ref_toks, 1)
    assert_tokens("toks", toks, ref_toks)
    assert len(np.unique(toks)) > 10  # real speech gives varied tokens, not one repeated code
    assert_close("audio", np.concatenate(audio, 1), np.concatenate(ref_audio, 1), rel=1e-5)
    # the state ONNX Runtime carries is fastfocal's state after the same chunks
    ref_state = [t for st in ff_s.states.values() for t in st.tensors()]
    for name, got, ref in zip(names, ort_s.state, ref_state):
        if name.endswith(".pos"):
            assert (got == ref.numpy()).all() and int(got[0]) > 0, name
        else:
            assert_close(name, got, ref, rel=1e-5, atol=1e-7)


def test_full_any_push_sizes_and_reset(causal, data_dir, full_onnx):
    sig = _speech(data_dir, "p287_007.wav")
    ref_toks, ref_audio = causal.stream().push(torch.from_numpy(sig))
    s = OnnxStream(full_onnx)
    s.push(sig[:3 * CHUNK])  # another stream first: reset must start a fresh one
    s.reset()
    outs = [s.push(sig[a:a + 1000]) for a in range(0, len(sig), 1000)]
    outs = [o for o in outs if o is not None]
    assert_tokens("toks", np.concatenate([o[0] for o in outs], 1), ref_toks)
    assert_close("audio", np.concatenate([o[1] for o in outs], 1), ref_audio, rel=1e-5)


def test_decode_batch_two(causal, data_dir, tmp_path):
    sigs = [_speech(data_dir, n) for n in ("84-121123-0000.wav", "p287_007.wav")]
    n = min(len(s) for s in sigs)
    toks = causal.stream_encoder(batch_size=2).push(torch.from_numpy(np.stack([s[:n] for s in sigs])))
    path = export(causal, tmp_path / "decode.onnx", "decode", batch=2, optimize=False)
    s = OnnxStream(path)
    assert s.batch == 2 and s.chunk == 4
    audio = s.push(toks.numpy())
    ref = causal.stream_decoder(batch_size=2).push(toks)
    assert audio.shape == ref.shape == (2, toks.shape[1] * 480)
    assert_close("audio", audio, ref, rel=1e-5)
    assert not np.allclose(audio[0], audio[1])  # rows are their own streams


def test_bad_input_is_refused_before_anything_runs(causal, data_dir, full_onnx):
    """Bad input raises before the graph runs, and a refused push leaves the stream as it was:
    after it, clean chunks give exactly fastfocal's outputs for those chunks alone (before, the
    NaN entered the state and every later chunk failed)."""
    from fastfocal.inputs import InputError

    s = OnnxStream(full_onnx)
    sig = _speech(data_dir, "84-121123-0000.wav")
    x = sig[:2 * CHUNK].copy()
    x[5] = np.nan
    for bad, match in ((x, "NaN or Inf"), (sig[20000:20000 + CHUNK] * 1000, "magnitude"), (sig[:CHUNK].astype(np.int16), "floating point"),
                       (np.stack([sig[:CHUNK]] * 2), r"must be \(1, n\)")):
        with pytest.raises(InputError, match=match):
            s.push(bad)
    assert s._buf.shape[1] == 0 and all(int(p[0]) == 0 for n, p in zip(state_names(causal.stream().states), s.state)
                                         if n.endswith(".pos"))
    t, y = s.push(sig[:3 * CHUNK])
    rt, ry = causal.stream().push(torch.from_numpy(sig[:3 * CHUNK]))
    assert_tokens("after a refused push", t, rt)
    assert_close("audio", y, ry.numpy(), rel=1e-5)


def test_decode_tokens_checked_against_the_codebook(causal, tmp_path):
    from fastfocal.inputs import InputError

    path = export(causal, tmp_path / "decode1.onnx", "decode", batch=1, optimize=False)
    s = OnnxStream(path)
    assert s.codebook_size == causal.codebook_size  # from the model's metadata
    toks = np.arange(8) * 97
    for bad, match in ((toks + causal.codebook_size, "token out of range"), (toks - 1000, "token out of range"),
                       (toks + 0.5, "integer tensor")):
        with pytest.raises(InputError, match=match):
            s.push(bad)
    assert_close("audio", s.push(toks), causal.stream_decoder().push(torch.from_numpy(toks)[None]).numpy(), rel=1e-5)


def test_export_refuses_16_bit(data_dir, tmp_path, capsys):
    assert main(["export-onnx", "--mode", "full", "--model", str(data_dir / "tiny_causal"), "--dtype", "bf16",
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert "export a float32 codec" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_flush_ends_streams_like_fastfocal(causal, data_dir, tmp_path, full_onnx):
    """OnnxStream had no flush: a stream's last partial chunk was dropped unless the caller
    padded it. Its flush zero-pads the chunk through the step: tokens equal fastfocal's flush;
    audio of a partial token group is the padded group's (fastfocal's flush decodes that group
    at its own length), and the stream starts fresh after it."""
    sig = read_audio(data_dir / "audio" / "84-121123-0000.wav", 16000)
    n = 5 * CHUNK + 700  # 5 chunks + 3 started frames
    x = sig[:n]
    enc = OnnxStream(export(causal, tmp_path / "enc.onnx", "encode", batch=1, optimize=False))
    assert enc.flush().shape == (1, 0)  # nothing pending
    got = np.concatenate([enc.push(x[:3000]), enc.push(x[3000:]), enc.flush()], 1)
    ref = causal.stream_encoder()
    want = torch.cat([ref.push(torch.from_numpy(x)), ref.flush()], 1).numpy()
    assert got.shape == (1, 23)
    assert_tokens("encode flush", got, want)
    assert enc._buf.shape[1] == 0
    assert_tokens("a fresh stream after flush", enc.push(x[:2 * CHUNK]),
                  causal.stream_encoder().push(torch.from_numpy(x[:2 * CHUNK])))

    full = OnnxStream(full_onnx)
    t1, a1 = full.push(x)
    t2, a2 = full.flush()
    ff = causal.stream()
    r1, q1 = ff.push(torch.from_numpy(x))
    r2, q2 = ff.flush()
    assert_tokens("full flush", np.concatenate([t1, t2], 1), torch.cat([r1, r2], 1))
    assert a2.shape == q2.shape == (1, 3 * 480)
    # the audio of the zero-padded chunk, cut: fastfocal's stream fed that chunk
    padded = np.zeros(6 * CHUNK, np.float32)
    padded[:n] = x
    ref_t, ref_a = causal.stream().push(torch.from_numpy(padded))
    assert_close("full flush audio", np.concatenate([a1, a2], 1), ref_a[:, :23 * 480].numpy(), rel=1e-5)

    d = OnnxStream(export(causal, tmp_path / "dec.onnx", "decode", batch=1, optimize=False))
    toks = np.concatenate([t1, t2], 1)
    audio = np.concatenate([d.push(toks), d.flush()], 1)
    assert audio.shape == (1, 23 * 480) and d._buf.shape[1] == 0
    held = np.concatenate([toks, toks[:, -1:]], 1)  # the group padded with its last token
    assert_close("decode flush", audio, causal.stream_decoder().push(torch.from_numpy(held))[:, :23 * 480].numpy(),
                 rel=1e-5)
