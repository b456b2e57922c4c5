"""StreamEngine: many streams with their own clocks equal independent sessions; isolation of bad
streams; slot reuse; encode/decode modes; buckets and padding; state bytes; CUDA graphs (gpu)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import fastfocal
from fastfocal.engine import EngineFull, StreamEngine
from fastfocal.inputs import InputError
from fastfocal import tactics
from fastfocal.graphs import buckets_for, pick_bucket
from fastfocal.kernels import _common
from helpers import assert_close, assert_tokens

T = torch.from_numpy


pytestmark = pytest.mark.usefixtures("one_thread")


def windows(golden, n, seed):
    """n stretches of real speech of different lengths (none a multiple of 1280)."""
    rng = np.random.default_rng(seed)
    sig = golden["sig"]
    out = []
    for i in range(n):
        ln = int(rng.integers(5000, 12000)) | 1
        a = int(rng.integers(0, sig.shape[1] - ln))
        out.append(T(sig[i % 2, a:a + ln].copy()))
    return out


def reference(codec, mode, x):
    """The same input through an independent batch-1 session, pushed at once, then flushed."""
    if mode == "full":
        s = codec.stream(1)
        t1, y1 = s.push(x[None])
        t2, y2 = s.flush()
        return torch.cat([t1, t2], 1)[0], torch.cat([y1, y2], 1)[0]
    if mode == "encode":
        s = codec.stream_encoder(1)
        return torch.cat([s.push(x[None]), s.flush()], 1)[0], None
    s = codec.stream_decoder(1)
    return None, torch.cat([s.push(x[None]), s.flush()], 1)[0]


def drive(engine, inputs, seed, max_piece, drop=()):
    """Streams join at random ticks when a slot is free, submit random-size pieces, step, and
    finish when their input runs out (those in `drop` are closed mid-flight instead).
    Returns {input index: (tokens, audio)} joined over steps and the finish tail."""
    rng = np.random.default_rng(seed)
    join = sorted(rng.integers(0, 8, len(inputs)).tolist())
    sid_of, pos, got, out = {}, {}, {}, {}
    waiting = list(range(len(inputs)))
    tick = 0
    while waiting or sid_of:
        while waiting and join[waiting[0]] <= tick and len(engine) < engine.max_streams:
            i = waiting.pop(0)
            sid_of[i], pos[i], got[i] = engine.open(), 0, []
        for i in list(sid_of):
            x = inputs[i]
            if i in drop and pos[i] > len(x) // 2:
                engine.close(sid_of.pop(i))
                continue
            if pos[i] >= len(x):
                got[i].append(engine.finish(sid_of.pop(i)))
                out[i] = got[i]
                continue
            n = int(rng.integers(1, max_piece))
            engine.submit(sid_of[i], x[pos[i]:pos[i] + n])
            pos[i] += n
        res = engine.step()
        inv = {s: i for i, s in sid_of.items()}
        assert set(res) <= set(inv), "outputs only for open streams"
        for s, o in res.items():
            assert o.error is None
            got[inv[s]].append(o)
        tick += 1
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return {i: (cat([o.tokens for o in v]), cat([o.audio for o in v])) for i, v in out.items()}


@pytest.mark.parametrize("mode", ["full", "encode"])
def test_many_streams_equal_single_sessions(causal, golden_causal, mode):
    inputs = windows(golden_causal, 6, seed=1)
    engine = StreamEngine(causal, 3, mode=mode)
    ptrs = [t.data_ptr() for st in engine.states.values() for t in st.tensors()]
    got = drive(engine, inputs, seed=2, max_piece=3000, drop={4})
    assert sorted(got) == [0, 1, 2, 3, 5]
    for i, (toks, audio) in got.items():
        ref_t, ref_a = reference(causal, mode, inputs[i])
        assert toks.shape[0] == -(-len(inputs[i]) // 320)
        assert_tokens(f"stream {i} tokens", toks, ref_t)
        if mode == "full":
            assert_close(f"stream {i} audio", audio, ref_a, rel=1e-5)
    assert [t.data_ptr() for st in engine.states.values() for t in st.tensors()] == ptrs  # never reallocated


def test_decode_mode_equals_single_sessions(causal):
    rng = np.random.default_rng(3)
    inputs = [T(rng.integers(0, causal.codebook_size, int(n))) for n in rng.integers(9, 31, 5)]
    engine = StreamEngine(causal, 2, mode="decode")
    got = drive(engine, inputs, seed=4, max_piece=7)
    for i, (toks, audio) in got.items():
        assert toks is None
        assert_close(f"stream {i} audio", audio, reference(causal, "decode", inputs[i])[1], rel=1e-5)


def _feed(engine, ids, inputs, chunk=1280):
    """Whole chunks to every stream in lockstep; returns per id the list of step outputs."""
    outs = {s: [] for s in ids}
    for a in range(0, min(len(x) for x in inputs), chunk):
        for s, x in zip(ids, inputs):
            engine.submit(s, x[a:a + chunk])
        for s, o in engine.step().items():
            outs[s].append(o)
    return outs


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_bad_stream_is_isolated_and_reported(causal, golden_causal, poison):
    inputs = windows(golden_causal, 3, seed=5)
    bad = inputs[1].clone()
    if poison == "nan":
        bad[3000:3100] = float("nan")  # chunk 2
        bad[4000] = float("inf")
    else:
        bad[2560:3840] = 3e38  # finite but far beyond float PCM: flagged before it can overflow
    runs = {}
    for name, mid in (("clean", inputs[1]), ("bad", bad)):
        e = StreamEngine(causal, 4)
        ids = [e.open() for _ in range(3)]
        runs[name] = (e, ids, _feed(e, ids, [inputs[0], mid, inputs[2]]))
    (_, ids, clean), (e, _, dirty) = runs["clean"][:3], runs["bad"]
    for s in (ids[0], ids[2]):  # same batch composition: other rows bit-identical
        for a, b in zip(clean[s], dirty[s]):
            assert a.error is None and b.error is None
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.audio, b.audio)
    want = "non-finite input" if poison == "nan" else "input out of range"
    assert [o.error for o in dirty[ids[1]]] == [None, None] + [want] * (len(dirty[ids[1]]) - 2)
    assert all(o.error is None for o in clean[ids[1]])
    assert e.error(ids[1]) == want
    # the poisoned slot is reused by the next stream: reset in place, clean output
    e.close(ids[1])
    new = e.open()
    assert e.slot_of(new) == 1 and e.error(new) is None
    x = inputs[1][:3 * 1280]
    e.submit(new, x)
    toks, audio = [], []
    while e.ready():
        o = e.step()[new]
        toks.append(o.tokens)
        audio.append(o.audio)
    ref_t, ref_a = reference(causal, "full", x)
    assert_tokens("reused slot", torch.cat(toks), ref_t)
    assert_close("reused slot", torch.cat(audio), ref_a, rel=1e-5)


def _rows(engine, slot):
    return [t[slot].clone() for st in engine.states.values() for t in st.tensors()]


def test_streams_without_a_chunk_are_untouched(causal, golden_causal):
    x = windows(golden_causal, 1, seed=6)[0]
    e = StreamEngine(causal, 4)
    a, b, c = e.open(), e.open(), e.open()
    for s in (a, b, c):
        e.submit(s, x[:1280])
    e.step()  # every slot now holds some state worth disturbing
    e.submit(a, x[1280:2560])
    e.submit(b, x[:700])  # not a whole chunk
    before = {s: _rows(e, e.slot_of(s)) for s in (a, b, c)}
    scratch = _rows(e, e.scratch)
    assert e.ready() == [a]
    assert list(e.step()) == [a]
    for s in (b, c):
        assert all(torch.equal(p, q) for p, q in zip(before[s], _rows(e, e.slot_of(s)))), s
    assert all(torch.equal(p, q) for p, q in zip(scratch, _rows(e, e.scratch))), "unpadded eager: scratch idle"
    assert not all(torch.equal(p, q) for p, q in zip(before[a], _rows(e, e.slot_of(a))))
    assert e.pending(b) == 700 and e.step() == {}


def test_buckets_and_padding(causal, golden_causal):
    assert buckets_for(1) == [1]
    assert buckets_for(5) == [1, 2, 4, 5]
    assert buckets_for(8) == [1, 2, 4, 8]
    assert [pick_bucket([1, 2, 4, 5], n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 5]
    for n in (0, 6):
        with pytest.raises(ValueError):
            pick_bucket([1, 2, 4, 5], n)
    inputs = windows(golden_causal, 3, seed=7)
    plain, padded = StreamEngine(causal, 8), StreamEngine(causal, 8)
    padded.runner.pad_eager = True  # run the bucket (4 rows) as graphs do; row 3 -> scratch
    assert padded.runner.rows_for(3) == 4 and plain.runner.rows_for(3) == 3
    ids = [[e.open() for _ in range(3)] for e in (plain, padded)]
    untouched = _rows(padded, 5)
    scratch = _rows(padded, padded.scratch)
    ref = _feed(plain, ids[0], inputs)
    got = _feed(padded, ids[1], inputs)
    assert padded.runner.idx[3].item() == padded.scratch
    for s0, s1 in zip(*ids):
        for a, b in zip(ref[s0], got[s1]):
            assert_tokens("padded", b.tokens, a.tokens)
            assert_close("padded", b.audio, a.audio, rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(untouched, _rows(padded, 5)))
    assert not torch.equal(scratch[0], _rows(padded, padded.scratch)[0]), "padding rows ran on the scratch slot"


def test_session_graph_path_logic_on_cpu(causal, golden_causal, monkeypatch):
    """The CUDA session path (one runner call per chunk, static buffers) run eagerly on CPU."""
    import fastfocal.streaming as S

    sig = T(golden_causal["sig"][:, :9000])
    toks = T(golden_causal["dec_toks"][:, :23])
    ref = (causal.stream(2), causal.stream_encoder(2), causal.stream_decoder(2))
    monkeypatch.setattr(S, "graphs_enabled", lambda *a: True)
    monkeypatch.setattr(S.GraphRunner, "capture", lambda self: True)
    new = (causal.stream(2), causal.stream_encoder(2), causal.stream_decoder(2))
    assert all(s._graph is not None for s in new)
    for sizes in ([1279, 4000, 3721], [9000]):
        (rs, re_, rd), (gs, ge, gd) = ref, new
        outs = []
        for s in (rs, gs):
            parts = [s.push(sig[:, a:a + n]) for a, n in zip(np.cumsum([0] + sizes[:-1]), sizes)] + [s.flush()]
            outs.append((torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)))
        assert_tokens("stream", outs[1][0], outs[0][0])
        assert_close("stream", outs[1][1], outs[0][1], rel=1e-5)
        e = [torch.cat([s.push(sig[:, :5000]), s.push(sig[:, 5000:]), s.flush()], 1) for s in (re_, ge)]
        assert_tokens("encoder", e[1], e[0])
        d = [torch.cat([s.push(toks[:, :9]), s.push(toks[:, 9:]), s.flush()], 1) for s in (rd, gd)]
        assert_close("decoder", d[1], d[0], rel=1e-5)


def test_errors(causal, noncausal):
    e = StreamEngine(causal, 2)
    a = e.open()
    e.open()
    with pytest.raises(EngineFull, match="all 2 streams"):
        e.open()
    e.close(a)
    with pytest.raises(KeyError, match="closed"):
        e.submit(a, torch.zeros(10))
    with pytest.raises(KeyError, match="unknown"):
        e.finish(99)
    b = e.open()
    with pytest.raises(fastfocal.InputError, match="floating point"):
        e.submit(b, torch.zeros(10, dtype=torch.int16))
    with pytest.raises(fastfocal.InputError, match="shape"):
        e.submit(b, torch.zeros(2, 10))
    with pytest.raises(fastfocal.InputError, match="numpy|Tensor"):
        e.submit(b, [0.0] * 10)
    e.submit(b, np.zeros(10, dtype=np.float32))  # numpy and (1, n) are fine
    e.submit(b, torch.zeros(1, 10))
    assert e.pending(b) == 20
    d = StreamEngine(causal, 1, mode="decode")
    s = d.open()
    with pytest.raises(fastfocal.InputError, match="out of range"):
        d.submit(s, torch.tensor([0, causal.codebook_size]))
    with pytest.raises(fastfocal.InputError, match="integer"):
        d.submit(s, torch.zeros(4))
    with pytest.raises(fastfocal.InputError, match="causal"):
        StreamEngine(noncausal, 2)
    with pytest.raises(fastfocal.InputError, match="mode"):
        StreamEngine(causal, 2, mode="both")
    with pytest.raises(fastfocal.InputError, match="max_streams"):
        StreamEngine(causal, 0)
    with pytest.raises(fastfocal.InputError, match="dtype"):
        StreamEngine(causal, 2, dtype=torch.bfloat16)
    e.close(b)
    empty = e.finish(e.open())  # nothing pending: empty outputs
    assert empty.tokens.shape == (0,) and empty.audio.shape == (0,) and empty.error is None


def test_state_bytes(causal):
    e = StreamEngine(causal, 3)
    s = causal.stream(1)
    sess = sum(st.nbytes for st in s.states.values())
    assert e.state_bytes_per_stream == StreamEngine.bytes_per_stream(causal) == sess
    assert e.state_bytes == 4 * sess  # 3 slots + scratch
    assert StreamEngine.max_streams_for(causal, 10 * sess) == 9
    enc, dec = (StreamEngine.bytes_per_stream(causal, m) for m in ("encode", "decode"))
    assert enc + dec == sess
    # the full-size model, counted from its config by the layout the README documents (Serving):
    # conv caches of k-1 input frames, K/V rings of window - chunk frames, focal rings of the
    # power of two >= K-1 frames per level, time-major rings of the power of two >= frames read + a
    # step's chunk, one int64 position per stage
    cfg = fastfocal.preset("50hz_4k_causal")
    e, c, d, dec = cfg.encoder, cfg.compressor, cfg.decompressor, cfg.decoder
    chunk = 4
    pow2 = lambda n: 1 << (n - 1).bit_length()  # noqa: E731
    ins = (1,) + e.hidden_dims[:-1]
    elems = sum((k - 1) * ci for k, ci in zip(e.kernel_sizes, ins))
    elems += pow2(e.conv_pos - 1 + chunk) * e.dim
    elems += e.num_layers * 2 * (e.window_size - chunk) * e.dim
    for part, window in ((c, c.window_size), (d, d.last_window_size)):
        taps = [part.focal_window + part.focal_factor * i for i in range(part.focal_level)] + [window]
        elems += sum(pow2(k - 1) for k in taps) * sum(part.hidden_dims)
    elems += pow2(dec.kernel_size - 1 + chunk) * dec.input_dim + dec.num_layers * dec.dim * (dec.kernel_size - 1)
    assert StreamEngine.bytes_per_stream(cfg) == 4 * elems + 4 * 8
    assert StreamEngine.bytes_per_stream(cfg, dtype=torch.bfloat16) == 2 * elems + 4 * 8
    assert f"full {4 * elems / 2**20:.1f} MiB fp32 / {2 * elems / 2**20:.1f} MiB bf16" in \
        (Path(__file__).parents[1] / "README.md").read_text()


def test_nvtx_helper_is_a_context_manager(monkeypatch):
    """Off: one shared no-op context. On: a named range of the fastfocal domain pushed on entry
    and popped on exit, also when the body raises; each name's attributes built once."""
    from fastfocal import profiling

    monkeypatch.setattr(profiling, "ENABLED", False)
    assert profiling.nvtx_range("a") is profiling.nvtx_range("b") is profiling._NULL
    calls = []

    class Domain:
        def get_event_attributes(self, name):
            calls.append(("attr", name))
            return name

        def push_range(self, attr):
            calls.append(("push", attr))

        def pop_range(self):
            calls.append(("pop",))

    monkeypatch.setattr(profiling, "ENABLED", True)
    monkeypatch.setattr(profiling, "_DOMAIN", Domain())
    monkeypatch.setattr(profiling, "_RANGES", {})
    for _ in range(2):
        with profiling.nvtx_range("step"):
            calls.append(("body",))
    with pytest.raises(ValueError):
        with profiling.nvtx_range("bad"):
            raise ValueError
    assert calls == [("attr", "step"), ("push", "step"), ("body",), ("pop",), ("push", "step"), ("body",), ("pop",),
                     ("attr", "bad"), ("push", "bad"), ("pop",)]


# --------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def causal_cuda(data_dir):
    return fastfocal.load(data_dir / "tiny_causal", device="cuda", dtype=torch.float32)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["full", "encode", "decode"])
def test_graph_replay_equals_eager_every_bucket(causal_cuda, golden_causal, mode):
    c = causal_cuda
    g = StreamEngine(c, 8, mode=mode)
    e = StreamEngine(c, 8, mode=mode, cuda_graphs=False)
    e.runner.pad_eager = True  # same padded shapes as the graphs
    assert sorted(g.runner.graphs) == [1, 2, 4, 8] and not e.runner.graphs
    if tactics.enabled() and _common.pdl_available("cuda"):  # float32 times PDL alone (same arithmetic); timing stepped the slots
        assert sorted(g.tactics) == [1, 2, 4, 8] and all(set(t) == {"pdl"} for t in g.tactics.values())
    rng = np.random.default_rng(8)
    for n in range(1, 9):  # every bucket, padded and exact
        ids = [[x.open() for _ in range(n)] for x in (g, e)]
        for _ in range(3):
            if mode == "decode":
                data = [T(rng.integers(0, c.codebook_size, 4)) for _ in range(n)]
            else:
                a = int(rng.integers(0, 60000))
                data = [T(golden_causal["sig"][i % 2, a:a + 1280].copy()) for i in range(n)]
            res = []
            for x, sids in zip((g, e), ids):
                for s, d in zip(sids, data):
                    x.submit(s, d)
                res.append(x.step())
            for s0, s1 in zip(*ids):
                a, b = res[0][s0], res[1][s1]
                if mode != "decode":
                    assert torch.equal(a.tokens, b.tokens), f"bucket for {n}: tokens"
                if mode != "encode":
                    torch.testing.assert_close(a.audio, b.audio, rtol=1e-5, atol=1e-6)
        for x, sids in zip((g, e), ids):
            for s in sids:
                x.close(s)


@pytest.mark.gpu
@gpu
def test_tuned_bf16_engine(data_dir, golden_causal, monkeypatch):
    """bf16 times every switch it may (tactics.space) per bucket; the chosen forms compute what
    the defaults do, within bf16 rounding, from the first step (the timed slots were reset)."""
    monkeypatch.setenv("FASTFOCAL_TUNE", "1")
    c = fastfocal.load(data_dir / "tiny_causal", device="cuda", dtype=torch.bfloat16)
    tuned, plain = StreamEngine(c, 8, mode="encode"), StreamEngine(c, 8, mode="encode", tune=False)
    assert sorted(tuned.tactics) == [1, 2, 4, 8] and not plain.tactics
    for b, t in tuned.tactics.items():
        assert set(t) == set(tactics.space(b, torch.bfloat16, "cuda")) and tactics.key(t) in tuned.runner.timings[b]
    sig = golden_causal["sig"]
    ids = [[x.open() for _ in range(8)] for x in (tuned, plain)]
    toks = [[], []]
    for a in range(0, 20 * 1280, 1280):
        for i, (x, sids) in enumerate(zip((tuned, plain), ids)):
            for j, s in enumerate(sids):
                x.submit(s, T(sig[j % 2, a:a + 1280].copy()))
            out = x.step()
            toks[i].append(torch.stack([out[s].tokens for s in sids]))
    a, b = torch.cat(toks[0], 1), torch.cat(toks[1], 1)
    assert (a == b).float().mean() >= 0.9, f"tuned vs default tokens agree {(a == b).float().mean():.3f}"


@pytest.mark.gpu
@gpu
def test_step_has_no_host_sync(causal_cuda):
    e = StreamEngine(causal_cuda, 4, cuda_graphs=False)
    x = torch.randn(3, 1280, device="cuda") * 0.1
    idx = torch.tensor([0, 2, 3], device="cuda")
    e.runner.run(3, [x], idx)  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        e.runner.run(3, [x], idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@gpu
def test_session_graphs_equal_eager(causal_cuda, golden_causal):
    sig = T(golden_causal["sig"][:1, :20000]).cuda()
    outs = []
    for graphs in (True, False):
        s = fastfocal.Stream(causal_cuda, 1, cuda_graphs=graphs)
        assert (s._graph is not None) == graphs
        parts = [s.push(sig[:, a:a + 3000]) for a in range(0, 20000, 3000)] + [s.flush()]
        outs.append([torch.cat(p, 1) for p in zip(*parts)])
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


def test_engine_freezes_the_heap_out_of_full_collections(causal):
    """A built engine, its model and its state leave the cyclic GC's scans (a full collection
    over a loaded model's objects stalls a step; bench/engine_host.py), unless asked not to;
    objects made later are still collected."""
    import gc

    gc.unfreeze()
    try:
        kept = StreamEngine(causal, 2, freeze_gc=False)
        assert gc.get_freeze_count() == 0 and gc.is_tracked(kept.pipeline) and any(o is kept.pipeline for o in gc.get_objects())
        e = StreamEngine(causal, 2)
        frozen = gc.get_freeze_count()
        assert frozen > 0 and not any(o is e.pipeline or o is kept.pipeline for o in gc.get_objects())
        sid = e.open()
        e.submit(sid, np.zeros(1280, np.float32))
        out = e.step()[sid]
        assert any(o is out for o in gc.get_objects())  # new objects: scanned as usual

        class Cycle:
            pass
        c = Cycle()
        c.me = c
        del c
        assert gc.collect() >= 1 and gc.get_freeze_count() == frozen  # later garbage cycles still go
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("mode", ["full", "decode"])
def test_submit_batch_equals_submits(causal, mode):
    """Streams at different ring positions (some wrapping, one past the ring's capacity so it
    grows): submit_batch leaves the rings, fills and the next steps exactly as k submits."""
    rng = np.random.default_rng(3)
    a, b = (StreamEngine(causal, 6, mode=mode) for _ in range(2))
    unit = a.chunk
    piece = (lambda n: (rng.standard_normal(n) * 0.1).astype(np.float32)) if mode == "full" else \
        (lambda n: rng.integers(0, causal.codebook_size, n))
    ids = [(a.open(), b.open()) for _ in range(5)]
    for (sa, sb), lead in zip(ids, [0, unit // 3, unit, unit + 7, 2 * unit - 1]):
        x = piece(lead + unit)
        a.submit(sa, x)
        b.submit(sb, x)
    a.step(), b.step()  # heads move: rows now write at different ring positions
    for n in (unit // 2 + 3, 3 * unit):  # the second grows the rings
        data = np.stack([piece(n) for _ in ids])
        order = [4, 0, 3, 1]  # any order, a subset of the streams
        for i in order:
            a.submit(ids[i][0], data[i])
        b.submit_batch([ids[i][1] for i in order], data[order])
        assert np.array_equal(a._fill, b._fill) and np.array_equal(a._head, b._head)
        assert a._ring.shape == b._ring.shape
        for i, (sa, sb) in enumerate(ids):
            assert a.pending(sa) == b.pending(sb)
        ra, rb = a.step_batch(), b.step_batch()
        assert np.array_equal(ra.errors, rb.errors) and len(ra) == len(rb) > 0
        for k in ("tokens", "audio"):
            if getattr(ra, k) is not None:
                assert torch.equal(getattr(ra, k), getattr(rb, k))
    sb = ids[0][1]
    with pytest.raises(fastfocal.InputError, match="appears twice"):
        b.submit_batch([sb, sb], np.stack([piece(4)] * 2))
    with pytest.raises(fastfocal.InputError, match=r"\(2, n\), one row per stream"):
        b.submit_batch([sb, ids[1][1]], piece(4))
    with pytest.raises(KeyError, match="unknown"):
        b.submit_batch([sb, 999], np.stack([piece(4)] * 2))
    before = b.pending(sb)
    if mode == "decode":
        with pytest.raises(fastfocal.InputError, match=r"tokens for 1 stream: token out of range"):
            b.submit_batch([sb], np.array([[0, causal.codebook_size]]))
    else:
        with pytest.raises(fastfocal.InputError, match="floating point"):
            b.submit_batch([sb], np.zeros((1, 4), np.int16))
    assert b.pending(sb) == before  # nothing written by a refused call


def test_submit_batch_finds_streams_across_opens_and_closes(causal):
    """The vectorised id -> slot lookup follows opens and closes; a closed or unknown id is
    refused by name, with nothing written; numpy ids work like a list."""
    e = StreamEngine(causal, 4)
    ids = [e.open() for _ in range(3)]
    x = np.full((2, 100), 0.1, np.float32)
    e.submit_batch(np.array(ids[:2]), x)
    e.close(ids[0])
    new = e.open()  # takes the freed slot
    assert e.slot_of(new) == 0 and e.pending(new) == 0
    e.submit_batch([ids[2], new], x)
    assert [e.pending(s) for s in (ids[1], ids[2], new)] == [100, 100, 100]
    with pytest.raises(KeyError, match=f"stream {ids[0]} is closed"):
        e.submit_batch([new, ids[0]], x)
    with pytest.raises(KeyError, match="stream 77 is unknown"):
        e.submit_batch([77], x[:1])
    assert e.pending(new) == 100
    for s in (ids[1], ids[2], new):
        e.close(s)
    with pytest.raises(KeyError, match="closed"):
        e.submit_batch([new], x[:1])


def test_step_input_is_a_ring_view_when_streams_step_together(causal):
    """Consecutive slots at one ring position: the step's input is a view of the (step-major)
    rings, no gather; otherwise a gather into the staging buffer. Both hold the submitted chunks."""
    e = StreamEngine(causal, 4)
    rng = np.random.default_rng(5)
    ids = [e.open() for _ in range(4)]
    data = [(rng.standard_normal(2 * 1280) * 0.1).astype(np.float32) for _ in ids]
    for sid, x in zip(ids, data):
        e.submit(sid, x)
    out = torch.empty(4, 1280)
    ring = torch.from_numpy(e._ring)
    x = e._take_chunks(np.array([0, 1, 2, 3]), out)
    assert x.data_ptr() == ring[0, 0].data_ptr() and x.data_ptr() != out.data_ptr()  # a view
    assert all(np.array_equal(x[i].numpy(), data[i][:1280]) for i in range(4))
    y = e._take_chunks(np.array([0, 2]), out[:2])  # not consecutive: gathered
    assert y.data_ptr() == out.data_ptr()
    assert np.array_equal(y[0].numpy(), data[0][1280:]) and np.array_equal(y[1].numpy(), data[2][1280:])
    z = e._take_chunks(np.array([1, 3]), out[:2])
    assert np.array_equal(z[1].numpy(), data[3][1280:])
    assert [e.pending(s) for s in ids] == [0, 0, 0, 0]


def test_step_outputs_are_the_rows_of_step_batch(causal):
    """step()'s per-stream outputs (their row views are made on first access) hold exactly
    step_batch's rows and error names, also for a poisoned stream and across later steps."""
    rng = np.random.default_rng(4)
    a, b = StreamEngine(causal, 4), StreamEngine(causal, 4)
    ids = [(a.open(), b.open()) for _ in range(3)]
    x = (rng.standard_normal((3, 2 * a.chunk)) * 0.1).astype(np.float32)
    x[1, 5] = np.nan
    for (sa, sb), row in zip(ids, x):
        a.submit(sa, row)
        b.submit(sb, row)
    first = a.step()  # read only after the next step ran
    second = a.step()
    for out in (first, second):
        assert len(out) == 3
    rb = [b.step_batch() for _ in range(2)]
    for got, want in zip((first, second), rb):
        assert list(got) == [sa for sa, _ in ids]
        for i, (sa, _) in enumerate(ids):
            o = got[sa]
            assert o.error == (None if i != 1 else "non-finite input")
            assert torch.equal(o.tokens, want.tokens[i]) and torch.equal(o.audio, want.audio[i])
            assert o.tokens.shape == (4,) and o.audio.shape == (want.audio.shape[1],)
    assert "StreamOutput(tokens=tensor(" in repr(first[ids[0][0]])


@pytest.mark.parametrize("batch", [False, True])
def test_one_streams_backlog_stays_its_own(causal, golden_causal, batch, monkeypatch):
    """A stream given far more input than the shared rings hold (one submit of many chunks)
    keeps the excess as its own backlog: the rings of every slot stay at MAX_RING_CHUNKS, its
    pending count holds it all, and its outputs (steps, then finish) equal an independent
    session's, as do those of a stream fed in real time beside it."""
    from fastfocal import engine as engine_mod

    monkeypatch.setattr(engine_mod, "MAX_RING_CHUNKS", 8)  # the sizes below assume 8
    inputs = windows(golden_causal, 2, seed=5)
    big = torch.cat([inputs[0]] * 3)  # ~12-27 chunks
    bx = torch.cat([inputs[1]] * 2)
    engine = StreamEngine(causal, 3, mode="full")
    a, b = engine.open(), engine.open()
    n = engine.chunk
    if batch:  # submit_batch: the row that does not fit (a: 5 + 4 chunks) goes to its backlog, b's to the ring
        engine.submit(a, big[:5 * n])
        engine.submit_batch([a, b], np.stack([big[5 * n:9 * n].numpy(), bx[:4 * n].numpy()]))
        assert engine._over and engine.pending(b) == 4 * n
        engine.submit(a, big[9 * n:])
        fed_b = 4 * n
    else:
        engine.submit(a, big)
        fed_b = 0
    assert engine._ring.shape[0] <= engine_mod.MAX_RING_CHUNKS
    assert engine.pending(a) == len(big)
    outs = {a: [], b: []}
    while a in engine.ready() or fed_b < len(bx):
        if fed_b < len(bx):
            engine.submit(b, bx[fed_b:fed_b + n])
            fed_b += n
        for s, o in engine.step().items():
            assert o.error is None
            outs[s].append(o)
        assert engine._ring.shape[0] <= engine_mod.MAX_RING_CHUNKS
    assert 0 < engine.pending(a) < engine.chunk
    outs[a].append(engine.finish(a))
    outs[b].append(engine.finish(b))
    for s, x in ((a, big), (b, bx)):
        ref_t, ref_a = reference(causal, "full", x)
        assert_tokens(f"stream {s} tokens", torch.cat([o.tokens for o in outs[s]]), ref_t)
        assert_close(f"stream {s} audio", torch.cat([o.audio for o in outs[s]]), ref_a, rel=1e-5)
    c = engine.open()  # the slot's backlog went with its stream
    assert engine.pending(c) == 0 and not engine._over


def test_backlog_goes_with_close_and_finish(causal):
    """close() drops a backlog; finish() runs ring and backlog in order."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(20 * 1280 + 333) * 0.1).astype(np.float32)
    engine = StreamEngine(causal, 2, mode="encode")
    s = engine.open()
    engine.submit(s, x[:1000])
    engine.submit(s, x[1000:])  # past the rings: a backlog, after what the ring holds
    assert engine.pending(s) == len(x) and engine._over
    got = engine.finish(s).tokens
    assert_tokens("finish over ring + backlog", got, reference(causal, "encode", T(x))[0])
    t = engine.open()
    engine.submit(t, x)
    engine.close(t)
    assert not engine._over


def test_submit_that_cannot_be_held_is_refused_untouched(causal, monkeypatch):
    """A broadcast view (np.broadcast_to: 2^34 samples in 4 bytes) went into the backlog as a
    dense copy: a bare MemoryError from numpy ("Unable to allocate 64.0 GiB"). A backlog that
    does not fit is now an InputError naming the stream, before anything is written."""
    from fastfocal import inputs

    e = StreamEngine(causal, 2)
    s = e.open()
    for x in (np.broadcast_to(np.float32(0.1), (1 << 34,)), torch.zeros(1, dtype=torch.bfloat16).expand(1 << 34)):
        with pytest.raises(InputError, match=r"audio of stream 0 .*broadcast view"):
            e.submit(s, x)
    assert e._fill[e._get(s)] == 0
    monkeypatch.setattr(inputs, "available_bytes", lambda device: 1 << 20)  # 1 MiB left
    big = np.full(1 << 20, 0.1, np.float32)  # 4 MiB: more than the ring, the rest a backlog
    with pytest.raises(InputError, match=r"a backlog of [\d,]+ samples for stream 0 needs"):
        e.submit(s, big)
    assert e._fill.sum() == 0 and not e._over  # nothing written
    e.submit(s, big[:1280])  # what fits is taken
    assert e.step()[s].tokens.shape[0] == 4


def test_refused_submit_batch_writes_no_stream(causal, monkeypatch):
    """submit_batch checked each row's backlog inside the write loop, so a refused batch had
    already fed the rows before the refused one (a retry fed them twice). Every row's backlog is
    now checked together before anything is written."""
    from fastfocal import inputs

    e = StreamEngine(causal, 2)
    a, b = e.open(), e.open()
    e.submit(b, np.full(16 * e.chunk + 100, 0.1, np.float32))  # b: a full ring and a backlog
    before = (e.pending(a), e.pending(b))
    n = 16 * e.chunk + 50_000
    room = e._cap - e._fill[e._get(a)]
    monkeypatch.setattr(inputs, "available_bytes", lambda device: (n - room) * 4 + 1024)  # a's fits, not both
    with pytest.raises(InputError, match=r"a backlog of [\d,]+ samples for 2 streams \(0, 1\) needs"):
        e.submit_batch([a, b], np.full((2, n), 0.1, np.float32))
    assert (e.pending(a), e.pending(b)) == before
