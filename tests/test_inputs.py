"""Bad input gets a clear error naming the problem, and never touches stream state."""
import numpy as np
import pytest
import torch

from fastfocal import InputError


@pytest.mark.parametrize(
    "sig, match",
    [
        (torch.zeros(2, 0), "empty"),
        (torch.zeros(0, 100), "empty"),
        (torch.full((1, 400), 0.1).index_fill_(1, torch.tensor([7]), float("nan")), "NaN or Inf"),
        (torch.full((1, 400), 0.1).index_fill_(1, torch.tensor([7]), float("inf")), "NaN or Inf"),
        (torch.full((2, 400), 0.1).index_fill_(1, torch.tensor([7]), 1e30), r"magnitude 1e\+30 \(rows \[0, 1\]\).*±8"),
        (torch.zeros(191520, 2), r"shape \(191520, 2\)\): it looks like \(samples, channels\).*x.mean\(1\) or pass x.T"),
        (torch.zeros(3, 100), "shorter than one 320-sample frame"),
        (torch.zeros(2, 100, dtype=torch.int16), "floating point.*int16"),
        (torch.zeros(1, 2, 100), r"\(samples,\) or \(batch, samples\)"),
        ([0.1, 0.2], "torch.Tensor or numpy array"),
    ],
)
def test_bad_audio(causal, sig, match):
    with pytest.raises(InputError, match=match):
        causal.sig_to_toks(sig)


@pytest.mark.parametrize(
    "toks, match",
    [
        (torch.tensor([[0, 4096]]), r"token out of range \[0, 4096\)"),
        (torch.tensor([[-1, 3]]), "token out of range"),
        (torch.tensor([[0.0, 1.0]]), "integer"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"\(T,\) or \(batch, T\)"),
    ],
)
def test_bad_tokens(causal, toks, match):
    with pytest.raises(InputError, match=match):
        causal.toks_to_sig(toks)


def test_bad_frames(causal):
    with pytest.raises(InputError, match=r"features must be \(T, 128\)"):
        causal.feats_to_lats(torch.zeros(1, 10, 64))
    with pytest.raises(InputError, match=r"codes must be \(T, 12\)"):
        causal.codes_to_qfeats(torch.zeros(1, 10, 13))
    with pytest.raises(InputError, match="NaN"):
        causal.feats_to_sig(torch.full((1, 4, 128), float("nan")))


def test_numpy_and_1d_inputs(causal, golden_causal):
    sig = golden_causal["sig"][0, :6400]
    t1 = causal.sig_to_toks(sig)  # numpy, 1-D
    assert t1.shape == (20,)
    t2 = causal.sig_to_toks(torch.from_numpy(sig)[None])
    assert torch.equal(t1, t2[0])
    assert causal.decode(t1.numpy()).shape == (20 * 480,)


def test_short_inputs(causal, noncausal):
    # one 20 ms frame is the shortest meaningful input: one token, a valid output
    assert causal.sig_to_toks(torch.randn(1, 320) * 0.1).shape == (1, 1)
    assert noncausal.sig_to_toks(torch.randn(1, 320) * 0.1).shape == (1, 1)
    assert causal.sig_to_sig(torch.randn(1, 320) * 0.1).shape == (1, 480)
    for codec in (causal, noncausal):  # shorter: refused, never a crash
        with pytest.raises(InputError, match="shorter than one 320-sample frame"):
            codec.sig_to_toks(torch.randn(10) * 0.1)


def test_bad_push_leaves_state_untouched(causal, golden_causal):
    sig = torch.from_numpy(golden_causal["sig"][:, :2560])
    s = causal.stream_encoder(batch_size=2)
    s.push(sig[:, :1280])
    snapshot = [t.clone() for t in s.states["encoder"].k_ring] + [s.states["encoder"].pos.clone()]
    bad = sig[:, 1280:].clone()
    bad[1, 5] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        s.push(bad)
    with pytest.raises(InputError, match=r"expected shape \(2, n\)"):
        s.push(sig[:1, 1280:])
    after = [t for t in s.states["encoder"].k_ring] + [s.states["encoder"].pos]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))
    assert s.pending == 0
    # and the stream goes on exactly as if nothing happened
    t = s.push(sig[:, 1280:])
    ref = causal.sig_to_toks(sig)
    assert torch.equal(t, ref[:, 4:])


def test_bad_session_args(causal):
    with pytest.raises(InputError, match="batch_size"):
        causal.stream(batch_size=0)
    s = causal.stream_decoder(batch_size=2)
    with pytest.raises(InputError, match="rows must be in"):
        s.reset(rows=[2])
    with pytest.raises(InputError, match="token out of range"):
        s.push(torch.full((2, 4), 5000))


def test_numpy_rejects_object_arrays(causal):
    with pytest.raises(InputError, match="numeric array"):
        causal.sig_to_toks(np.array(["a", "b"]))


def test_encode_resamples_other_rates(causal, golden_causal):
    import soxr

    sig16 = golden_causal["sig"][0, :16000]
    sig48 = soxr.resample(sig16, 16000, 48000, quality="HQ").astype(np.float32)
    ref = causal.sig_to_toks(soxr.resample(sig48, 48000, 16000, quality="HQ"))
    got = causal.encode(sig48, sample_rate=48000)
    assert torch.equal(got, ref)
    assert (got == causal.encode(sig16)).float().mean() > 0.5  # same speech, close tokens
    with pytest.raises(InputError, match="sample_rate"):
        causal.encode(sig16, sample_rate=0)
    # numpy scalars are numbers of Hz too (np.float64 was taken, np.int64 refused)
    for rate in (np.int64(48000), np.int32(48000), np.float64(48000.0)):
        assert torch.equal(causal.encode(sig48, sample_rate=rate), ref), type(rate)
    for rate in (np.bool_(True), np.int64(999), np.float64("nan"), "48000"):
        with pytest.raises(InputError, match=r"sample_rate must be a number of Hz in \[1000, 384000\]"):
            causal.encode(sig48, sample_rate=rate)


def test_memory_check_counts_the_output(causal, monkeypatch):
    """Offline runs hold their whole output: a decode's audio (480 float32 samples a token) and
    a round trip's are counted before any work, not only state and one segment's activations."""
    from fastfocal import codec as codec_mod
    from fastfocal import inputs
    from fastfocal.pipeline import Pipeline

    T = 10000
    for stages, x, out_samples, call in [
        (("decompressor", "decoder"), torch.zeros(1, T, dtype=torch.long), T * 480, causal.toks_to_sig),
        (("encoder", "compressor", "decompressor", "decoder"), torch.zeros(1, T * 320), T * 480, causal.sig_to_sig),
    ]:
        frames = x.shape[1] // (320 if stages[0] == "encoder" else 1)
        rest = (Pipeline.bytes_per_slot(causal.model, stages, torch.float32)
                + Pipeline.activation_bytes_for(causal.config, torch.float32, 1, frames))
        monkeypatch.setattr(codec_mod, "run_offline", lambda *a, **k: pytest.fail("ran before the memory check"))
        monkeypatch.setattr(inputs, "available_bytes", lambda device: rest + out_samples * 4)  # one copy is not enough
        with pytest.raises(InputError, match=rf"a batch of 1 x {x.shape[1]} (tokens|audio) needs .* split the input"):
            call(x)
        monkeypatch.undo()
        monkeypatch.setattr(inputs, "available_bytes", lambda device: rest + out_samples * 8 + 4096)
        assert call(x[:, :x.shape[1] // 10]).shape == (1, out_samples // 10)  # what fits runs
        monkeypatch.undo()


def test_available_memory_respects_the_address_space_limit(monkeypatch):
    """Under `ulimit -v` an allocation fails whatever RAM is free: checks must see the limit (a
    6 GB cap on a 24 GB machine let a 10 GiB decode through the check, to die in the allocator)."""
    import resource

    from fastfocal.inputs import available_bytes

    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    monkeypatch.setattr(resource, "getrlimit", lambda what: (mapped + (64 << 20), resource.RLIM_INFINITY))
    assert 0 < available_bytes("cpu") <= 64 << 20
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert available_bytes("cpu") > 64 << 20


def test_amplitude_check_makes_no_copy_of_the_input():
    """The NaN/Inf and ±8 check ran isfinite() and abs() over the whole input: a bool and a
    float copy of it (an hour of 16 kHz audio: +288 MB) on every offline call and push. It now
    takes the extremes in one pass; the verdicts are unchanged."""
    from torch.profiler import ProfilerActivity, profile

    from fastfocal.inputs import amplitude_problem, check_amplitude

    x = torch.randn(2, 1_000_000) * 0.1
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        check_amplitude(x)
    allocated = sum(max(e.cpu_memory_usage, 0) for e in p.key_averages())
    assert allocated < 1024, f"{allocated} bytes allocated to check {x.numel() * 4} bytes of audio"
    cases = [(torch.zeros(5), None), (torch.tensor([0.1, float("nan")]), "NaN"), (torch.tensor([-9.0]), "magnitude 9"),
             (torch.tensor([float("-inf"), 0.0]), "NaN or Inf"), (torch.tensor([8.0]).bfloat16(), None),
             (np.array([0.5, -8.5], np.float32), "magnitude 8.5"), (np.array([np.inf], np.float32), "NaN or Inf"),
             (torch.zeros(0), None), (np.zeros(0, np.float32), None)]
    for sig, want in cases:
        got = amplitude_problem(sig)
        assert (got is None) if want is None else (want in got), (sig, got)
    bad = x.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(InputError, match=r"audio contains NaN or Inf \(row \[1\]\)"):
        check_amplitude(bad)
