"""Streaming equals offline, for any push sizes; batch rows are independent; causality."""
import numpy as np
import pytest
import torch

from helpers import assert_close, assert_tokens

T = torch.from_numpy


def run_stream(codec, sig, sizes, batch=None):
    s = codec.stream(batch_size=sig.shape[0])
    toks, audio, a, i = [], [], 0, 0
    while a < sig.shape[1]:
        n = sizes[i % len(sizes)]
        t, y = s.push(sig[:, a:a + n])
        toks.append(t)
        audio.append(y)
        a += n
        i += 1
    t, y = s.flush()
    return torch.cat(toks + [t], 1), torch.cat(audio + [y], 1)


@pytest.mark.parametrize(
    "sizes",
    [[1279], [1281], [3 * 1280], [1280, 1, 2559, 700, 5000], [64000]],
    ids=["1279", "1281", "3x1280", "mixed", "all-at-once"],
)
def test_stream_equals_offline(causal, golden_causal, sizes):
    sig = T(golden_causal["sig"][:, :25600])
    toks, audio = run_stream(causal, sig, sizes)
    ref_toks = causal.sig_to_toks(sig)
    assert_tokens("toks", toks, ref_toks)
    assert_close("audio", audio, causal.sig_to_sig(sig), rel=1e-5)


def test_stream_one_sample_pushes(causal, golden_causal):
    sig = T(golden_causal["sig"][:1, 3000:3000 + 3 * 1280 + 5])
    toks, audio = run_stream(causal, sig, [1])
    # the first 3 chunks are whole: offline on those samples must agree exactly
    ref = causal.sig_to_toks(sig[:, : 3 * 1280])
    assert_tokens("toks", toks[:, :12], ref)
    # 5 leftover samples -> one started frame, from the zero-padded chunk
    assert toks.shape[1] == 13
    ref_sig = causal.sig_to_sig(sig[:, : 3 * 1280])
    assert_close("audio", audio[:, : ref_sig.shape[1]], ref_sig, rel=1e-5)


def test_flush_tail_matches_zero_padded_offline(causal, golden_causal):
    sig = T(golden_causal["sig"][:1, :2000])
    toks, _ = run_stream(causal, sig, [700])
    padded = torch.cat([sig, torch.zeros(1, 2560 - 2000)], 1)
    ref = causal.sig_to_toks(padded)[:, : -(-2000 // 320)]
    assert_tokens("toks", toks, ref)


@pytest.mark.parametrize("row,n", [(0, 7263), (0, 16236), (1, 35179), (0, 12800)])
def test_offline_tail_flush_equals_offline(causal, golden_causal, row, n):
    """flush(offline_tail=True) runs a partial last chunk at its own length, as offline encoding
    of the whole signal does: pushes (any sizes) + that flush give sig_to_toks's tokens. At these
    lengths the streaming rule's zero-padded chunk changes a last token (its frames see the
    padding), so the two flushes are told apart; whole chunks (12800) are the same either way."""
    sig = T(golden_causal["sig"][row:row + 1, :n])
    ref = causal.sig_to_toks(sig)
    for sizes in ([n], [1280, 999, 4000]):
        s = causal.stream_encoder(1)
        parts, a, i = [], 0, 0
        while a < n:
            parts.append(s.push(sig[:, a:a + sizes[i % len(sizes)]]))
            a, i = a + sizes[i % len(sizes)], i + 1
        assert_tokens(f"offline tail {sizes}", torch.cat(parts + [s.flush(offline_tail=True)], 1), ref)
    s = causal.stream_encoder(1)
    padded = torch.cat([s.push(sig), s.flush()], 1)
    assert torch.equal(padded, ref) == (n % 1280 == 0)


def test_stream_decoder_any_push_sizes(causal, golden_causal):
    toks = T(golden_causal["dec_toks"][:, :37])  # not a multiple of 4: last group partial
    ref = causal.decode(toks)
    for sizes in ([1], [3], [5, 2, 9]):
        s = causal.stream_decoder(batch_size=2)
        out, a, i = [], 0, 0
        while a < toks.shape[1]:
            n = sizes[i % len(sizes)]
            out.append(s.push(toks[:, a:a + n]))
            a, i = a + n, i + 1
        out.append(s.flush())
        assert_close(f"decode {sizes}", torch.cat(out, 1), ref, rel=1e-5)


def test_offline_segmentation_invariant(causal, golden_causal):
    sig = T(golden_causal["sig"])
    ref_t, ref_s = causal.sig_to_toks(sig), causal.sig_to_sig(sig)
    old = causal.segment_frames
    try:
        for seg in (4, 36, 200):
            causal.segment_frames = seg
            assert_tokens(f"toks seg={seg}", causal.sig_to_toks(sig), ref_t)
            assert_close(f"sig seg={seg}", causal.sig_to_sig(sig), ref_s, rel=1e-5)
    finally:
        causal.segment_frames = old


@pytest.mark.parametrize("name", ["causal", "noncausal"])
def test_batch_invariance(request, name, golden_causal):
    codec = request.getfixturevalue(name)
    sig = T(golden_causal["sig"][:, :20000])
    both_t, both_s = codec.sig_to_toks(sig), codec.sig_to_sig(sig)
    for r in range(2):
        assert_tokens(f"row {r}", codec.sig_to_toks(sig[r]), both_t[r])
        assert_close(f"row {r}", codec.sig_to_sig(sig[r]), both_s[r], rel=1e-5)


def test_reset_one_row_leaves_others(causal, golden_causal):
    sig = T(golden_causal["sig"][:, :12800])
    other = T(golden_causal["sig"][::-1, 20000:32800].copy())
    s = causal.stream(batch_size=2)
    t1, y1 = s.push(sig[:, :6400])
    s.reset(rows=[0])
    # row 0 now starts a new stream on `other`, row 1 continues
    t2, y2 = s.push(torch.stack([other[0, :6400], sig[1, 6400:]]))
    ref1_t, ref1_y = run_stream(causal, sig[1:], [6400])
    assert_tokens("row 1 continues", torch.cat([t1[1], t2[1]]), ref1_t[0])
    assert_close("row 1 continues", torch.cat([y1[1], y2[1]]), ref1_y[0], rel=1e-5)
    ref0_t, ref0_y = run_stream(causal, other[:1, :6400], [6400])
    assert_tokens("row 0 restarted", t2[0], ref0_t[0])
    assert_close("row 0 restarted", y2[0], ref0_y[0], rel=1e-5)


def test_reset_rows_needs_chunk_boundary(causal):
    import fastfocal

    s = causal.stream_encoder(batch_size=2)
    s.push(torch.zeros(2, 100))
    with pytest.raises(fastfocal.InputError, match="chunk boundary"):
        s.reset(rows=[1])
    s.reset()  # whole-session reset is always allowed
    assert s.pending == 0


def test_future_input_never_changes_past(causal, golden_causal):
    sig = T(golden_causal["sig"][:1, :25600])
    base_t, base_s = causal.sig_to_toks(sig), causal.sig_to_sig(sig)
    cut = 5 * 1280 + 77  # inside chunk 5
    changed = sig.clone()
    changed[:, cut:] = torch.randn(1, sig.shape[1] - cut) * 0.3
    t, s = causal.sig_to_toks(changed), causal.sig_to_sig(changed)
    done = (cut // 1280) * 4  # tokens of chunks that end before the change
    assert_tokens("past toks", t[:, :done], base_t[:, :done])
    assert not torch.equal(t[:, done:], base_t[:, done:]), "the change must show up later"
    n = done * 480
    torch.testing.assert_close(s[:, :n], base_s[:, :n], rtol=0, atol=0)


def test_state_size_constant(causal, golden_causal):
    s = causal.stream(batch_size=1)
    before = s.state_bytes
    ptrs = [t.data_ptr() for t in s.states["encoder"].k_ring]
    sig = T(golden_causal["sig"][:1])
    for a in range(0, 64000, 1280):
        s.push(sig[:, a:a + 1280])
    assert s.state_bytes == before
    assert [t.data_ptr() for t in s.states["encoder"].k_ring] == ptrs  # never reallocated


def test_noncausal_cannot_stream(noncausal):
    import fastfocal

    with pytest.raises(fastfocal.InputError, match="causal"):
        noncausal.stream()


def test_rings_wrap(causal, golden_causal):
    # tiny_causal: window 32 -> ring of 28 frames; 200 frames wrap it ~7 times
    st = causal.stream_encoder(batch_size=1)
    sig = T(golden_causal["sig"][:1])
    st.push(sig)
    assert int(st.states["encoder"].pos[0]) == 200
    assert st.states["encoder"].k_ring[0].shape[2] == 28
    assert not np.allclose(st.states["encoder"].k_ring[0].numpy(), 0)


def test_session_steps_its_state_in_place(causal, golden_causal, monkeypatch):
    """A session steps every slot in order, so it runs the pipeline with idx None (the state
    used in place on every device, no row gathers: launches that matter at batch 1 on a GPU)
    and gets the same tokens as an explicit index."""
    from fastfocal.pipeline import Pipeline

    seen = []
    run = Pipeline.run
    monkeypatch.setattr(Pipeline, "run", lambda self, x, idx, *a: seen.append(idx) or run(self, x, idx, *a))
    sig = T(golden_causal["sig"][:, :6400])
    s = causal.stream(batch_size=2)
    toks, _ = s.push(sig)
    toks = torch.cat([toks, s.flush()[0]], 1)
    assert seen and all(i is None for i in seen), seen
    p = Pipeline(causal.model, "full", 3)  # rows 2, 0 of three slots: gathered by index
    with torch.inference_mode():
        got = torch.cat([p.step(sig[:, a:a + 1280], torch.tensor([2, 0]))[0] for a in range(0, 6400, 1280)], 1)
    assert_tokens("index vs in place", got, toks)


def test_a_range_of_slots_steps_in_place(causal, golden_causal):
    """On CPU a step over slots lo..hi-1 in order runs on views of those state rows instead of
    gathering and scattering every ring by index. Alternating that form with the gathered one
    (the same slots in another order) over one state gives each stream's own tokens and audio,
    and the slots outside the range stay untouched."""
    from fastfocal.pipeline import Pipeline

    sig = T(golden_causal["sig"][:, :6400])
    two = torch.stack([sig[0], sig[0].flip(0)])
    ref_t, ref_a = causal.stream(batch_size=2).push(two)
    p = Pipeline(causal.model, "full", 4)
    assert p._span(torch.tensor([1, 2])) == (1, 3) and p._span(torch.tensor([2, 1])) is None
    toks, audio = [], []
    with torch.inference_mode():
        for k, a in enumerate(range(0, 6400, 1280)):
            x = two[:, a:a + 1280]
            if k % 2 == 0:
                t, y = p.step(x, torch.tensor([1, 2]))[:2]
            else:  # gathered: row 0 is slot 2
                t, y = (v.flip(0) for v in p.step(x.flip(0), torch.tensor([2, 1]))[:2])
            toks.append(t), audio.append(y)
    assert_tokens("range and index steps", torch.cat(toks, 1), ref_t)
    assert_close("audio", torch.cat(audio, 1), ref_a, rel=1e-5)
    for name, st in p.states.items():
        assert all((t[0] == 0).all() and (t[3] == 0).all() for t in st.tensors()), name
        assert (st.pos[1:3] == 20).all(), name


def test_state_rings_carved_from_one_buffer(causal):
    """A stage's rings are contiguous, 16-byte aligned, non-overlapping views of one zeroed
    buffer (one allocation and one fill for a fresh state); reset(rows) clears exactly those
    rows of every ring, reset() everything."""
    from fastfocal.pipeline import Pipeline

    p = Pipeline(causal.model, "full", 3)
    for name, st in p.states.items():
        rings = [t for t in st.tensors() if t is not st.pos]
        assert len({t.untyped_storage().data_ptr() for t in rings}) == 1, name
        assert all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in rings), name
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in rings)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"{name}: rings overlap"
        assert all((t == 0).all() for t in st.tensors())
        for i, t in enumerate(st.tensors()):
            t.copy_(torch.arange(t.numel()).reshape(t.shape) + i + 1)
        st.reset([1])
        assert all((t[1] == 0).all() and (t[0] != 0).all() and (t[2] != 0).all() for t in st.tensors()), name
        st.reset()
        assert all((t == 0).all() for t in st.tensors()), name
