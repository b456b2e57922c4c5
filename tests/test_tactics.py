"""Start-up tactic choice (fastfocal.tactics, graphs.GraphRunner.capture): the search, the
switches it sets and restores, which switches are timed where, that each switch really changes
the launches, and the runner's bookkeeping (best graph kept, failing candidates skipped, a
failing default -> eager). The CUDA timing itself runs in the GPU suite (test_engine.py)."""
import math
import warnings

import pytest
import torch

from fastfocal import graphs, ops, tactics
from fastfocal.kernels import _common, attention, focal_context as fc


def test_choose_takes_a_value_only_when_clearly_faster():
    space = {"a": (0, 1, 2), "b": (False, True)}
    cost = {(0, False): 10.0, (1, False): 9.9, (2, False): 8.0, (2, True): 7.0, (0, True): 1.0}
    calls = []

    def measure(t):
        calls.append(tactics.key(t))
        return cost[(t["a"], t["b"])]

    best, times = tactics.choose(space, measure, margin=0.03)
    # a=1 is 1% faster (noise): kept at 0; a=2 is 20% faster: taken; then b=True from a=2
    assert best == {"a": 2, "b": True}
    assert len(calls) == len(set(calls)) == 4  # each tactic measured once, (0, True) never
    assert times[tactics.key(best)] == 7.0


def test_choose_skips_failed_candidates_and_handles_no_switches():
    best, times = tactics.choose({"a": (0, 1)}, lambda t: math.inf if t["a"] else 5.0)
    assert best == {"a": 0}
    assert tactics.choose({}, lambda t: 0.0) == ({}, {(): 0.0})


def test_applied_sets_and_restores_every_switch():
    before = tactics.current()
    t = {"pdl": True, "large_gemm": True, "focal_window_rows": tactics.OFF, "attn_keys": 32}
    with pytest.raises(RuntimeError):
        with tactics.applied(t):
            assert tactics.current() == t
            assert ops.LARGE_GEMM and fc.WINDOW_ROWS == tactics.OFF and attention.STREAM_KEYS == 32
            assert _common.pdl_requested()
            raise RuntimeError("restored even so")
    assert tactics.current() == before and _common.pdl_override() is None
    with pytest.raises(KeyError, match="no tactic switch"):
        with tactics.applied({"warps": 8}):
            pass
    assert tactics.current() == before


def test_space(monkeypatch):
    assert tactics.space(4096, torch.bfloat16, "cpu") == {}  # nothing to time without CUDA
    monkeypatch.delenv("FASTFOCAL_LARGE_GEMM", raising=False)
    monkeypatch.setattr(_common, "pdl_available", lambda device: True)
    assert tactics.space(4096, torch.float32, "cuda") == {"pdl": (False, True)}  # rounding stays put
    assert set(tactics.space(1, torch.bfloat16, "cuda")) == {"pdl", "attn_keys"}
    big = tactics.space(64, torch.float16, "cuda")
    assert big == {"pdl": (False, True), "large_gemm": (False, True), "focal_window_rows": (64, tactics.OFF),
                   "attn_keys": (64, 32)}
    with tactics.applied({"large_gemm": True}):  # the current value comes first
        assert tactics.space(64, torch.bfloat16, "cuda")["large_gemm"] == (True, False)
    monkeypatch.setenv("FASTFOCAL_LARGE_GEMM", "0")  # set by the user: pinned
    assert "large_gemm" not in tactics.space(64, torch.bfloat16, "cuda")
    monkeypatch.setattr(_common, "pdl_available", lambda device: False)
    assert "pdl" not in tactics.space(64, torch.bfloat16, "cuda")


class _Recorder:
    """Stands in for a Triton kernel: records each launch's constexprs, then launches it."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        def go(*a, **k):
            self.launches.append(k)
            return self.fn[grid](*a, **k)
        return go


def test_switches_change_the_launches(monkeypatch):
    """Each switch changes what the kernels launch (so a graph captured under it keeps that form)."""
    g = torch.Generator().manual_seed(0)
    B, C, H, d, R = 64, 4, 2, 16, 12
    ks = [4, 5, 6]
    rows = _Recorder(fc._focal_rows_kernel)
    monkeypatch.setattr(fc, "_focal_rows_kernel", rows)
    ctx, gates = torch.randn(B, 4, C, generator=g), torch.randn(B, 4, 3, generator=g)
    ws = [torch.randn(C, 1, k, generator=g) for k in ks]
    bs = [torch.randn(C, generator=g) for _ in ks]
    caches = [torch.randn(B, C, fc.ring_len(k), generator=g) for k in ks]
    idx, start = torch.arange(B), torch.full((B,), 8)
    outs = []
    for t in ({}, {"focal_window_rows": tactics.OFF}):
        with tactics.applied(t):
            outs.append(fc.focal_context(ctx, gates, ws, bs, True, [c.clone() for c in caches], idx, start))
    assert len(rows.launches) == 1  # the default's many-row form, not the OFF one's fused launch
    # both forms against the float64 reference (comparing them only with each other would pass
    # a mistake they share)
    want = fc.focal_context_ref(ctx.double(), gates.double(), [w.double() for w in ws], [b.double() for b in bs], True,
                                [c.double() for c in caches], idx, start)
    for t, out in zip(("default", "OFF"), outs):
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m, t=t: f"focal {t}: {m}")

    attn = _Recorder(attention._attn_kernel)
    monkeypatch.setattr(attention, "_attn_kernel", attn)
    qkv, y = torch.randn(1, 4, 3 * H * d, generator=g), torch.randn(1, 4, H * d, generator=g)
    p = [torch.randn(8, d, generator=g), torch.randn(8, generator=g), torch.randn(1, H, 1, 1, generator=g),
         torch.randn(320, H, generator=g)]
    kr, vr = torch.randn(1, H, R, d, generator=g), torch.randn(1, H, R, d, generator=g)
    want = attention.rel_attention_ref(qkv.double(), y.double(), *[t.double() for t in p], H, torch.tensor([20]), 4, R + 4,
                                       320, 800, kr.double(), vr.double(), torch.tensor([0]))
    for keys in (64, 32):
        with tactics.applied({"attn_keys": keys}):
            out = attention.rel_attention(qkv, y, *p, H, torch.tensor([20]), 4, R + 4, 320, 800,
                                          kr.clone(), vr.clone(), torch.tensor([0]))
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m, k=keys: f"{k} keys: {m}")
    assert [k["BLOCK_N"] for k in attn.launches] == [64, 32]


class _FakeGraph:
    def __init__(self, tactic):
        self.tactic = tactic


class _FakeRunner(graphs.GraphRunner):
    """The runner's per-bucket search on CPU: capture and timing faked, the rest real."""

    def __init__(self, cost, fail=(), **kw):
        super().__init__(lambda x, idx: (x * 2,), [((3,), torch.float32)], [1, 2, 4], "cpu", 9, **kw)
        self.use_graphs = True
        self.cost, self.fail, self.timed_idx = cost, fail, []

    def _capture_one(self, b, pool, side):
        t = tactics.current()
        if (b, t["attn_keys"]) in self.fail:
            raise RuntimeError("capture failed")
        g = _FakeGraph(t)
        g.outs = (torch.zeros(b, 3),)
        return g, g.outs

    def _replay_ms(self, g):
        b = len(g.outs[0])
        self.timed_idx.append(self.idx[:b].tolist())
        return self.cost(b, g.tactic)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(tactics, "space", lambda b, dtype, device: {"attn_keys": (64, 32)} if b > 1 else {})
    monkeypatch.delenv("FASTFOCAL_TUNE", raising=False)


def test_runner_keeps_each_buckets_fastest_graph(fake_cuda):
    before = tactics.current()
    r = _FakeRunner(lambda b, t: 1.0 if (b == 4 and t["attn_keys"] == 32) else 2.0, tune_for=torch.bfloat16)
    assert r.capture()
    assert r.tactics == {4: {"attn_keys": 32}, 2: {"attn_keys": 64}}  # bucket 1 had nothing to time
    assert r.graphs[4][0].tactic["attn_keys"] == 32 and r.graphs[2][0].tactic["attn_keys"] == 64
    assert r.timings[4] == {(("attn_keys", 64),): 2.0, (("attn_keys", 32),): 1.0}
    assert tactics.current() == before  # the switches are back
    assert all(x == r.pad_slot for x in r.idx.tolist())  # timing's slot indices put back


def test_runner_skips_a_failing_candidate_and_falls_back_when_the_default_fails(fake_cuda):
    with pytest.warns(UserWarning, match="tactic .* failed at 4 rows"):
        r = _FakeRunner(lambda b, t: 1.0 if t["attn_keys"] == 32 else 2.0, fail=[(4, 32)], tune_for=torch.bfloat16)
        assert r.capture()
    assert r.tactics[4] == {"attn_keys": 64} and r.tactics[2] == {"attn_keys": 32}
    with pytest.warns(UserWarning, match="capture failed, running eagerly"):
        r = _FakeRunner(lambda b, t: 1.0, fail=[(2, 64)], tune_for=torch.bfloat16)
        assert not r.capture()
    assert not r.graphs and not r.tactics and not r.use_graphs


def test_runner_untuned(fake_cuda, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = _FakeRunner(lambda b, t: 1.0)  # tune_for None: one capture a bucket, at the defaults
        assert r.capture() and sorted(r.graphs) == [1, 2, 4] and not r.tactics and not r.timed_idx
        monkeypatch.setenv("FASTFOCAL_TUNE", "0")
        r = _FakeRunner(lambda b, t: 1.0, tune_for=torch.bfloat16)
        assert r.capture() and not r.tactics


def test_runner_times_on_distinct_slots(fake_cuda):
    """Timing replays step slots 0..b-1 (the pad slot alone would make every read an L2 hit)."""
    r = _FakeRunner(lambda b, t: 1.0, tune_for=torch.bfloat16, time_slots=True)
    r.capture()
    assert r.timed_idx and all(ix == list(range(len(ix))) for ix in r.timed_idx)


def test_runner_captures_fixed_tactics_untimed(fake_cuda):
    """An earlier build's tactics (JSON keys as strings) are captured as given, without timing."""
    r = _FakeRunner(lambda b, t: 1.0 if t["attn_keys"] == 64 else 2.0, tune_for=torch.bfloat16,
                    fixed={"4": {"attn_keys": 32}})
    assert r.capture()
    assert r.tactics[4] == {"attn_keys": 32} and r.graphs[4][0].tactic["attn_keys"] == 32
    assert 4 not in r.timings and r.tactics[2] == {"attn_keys": 64}  # bucket 2 still timed
    assert all(len(ix) == 2 for ix in r.timed_idx)


def test_engine_checks_fixed_tactics(causal):
    from fastfocal import InputError, StreamEngine

    e = StreamEngine(causal, 4, tactics={"2": {"attn_keys": 32, "pdl": True}, 4: {}})  # CPU: no graphs to capture
    assert e.runner.fixed == {2: {"attn_keys": 32, "pdl": True}, 4: {}} and e.tactics == {}
    for bad, msg in (({3: {}}, "bucket 3 is not one of"), ({"x": {}}, "not an integer"),
                     ({2: {"warps": 8}}, "no switch 'warps'"), ({2: {"attn_keys": 48}}, "48 is not a valid"),
                     ({2: {"pdl": 1}}, "1 is not a valid"), ({2: [("pdl", True)]}, "must be a dict"),
                     ({1.9: {}}, "1.9 is not an integer"), ({"2.0": {}}, "not an integer"),
                     ({2: {"attn_keys": 64.0}}, "64.0 is not a valid")):
        with pytest.raises(InputError, match=msg):
            StreamEngine(causal, 4, tactics=bad)
    import numpy as np  # numpy integers (a tactics dict built with numpy) are integers, kept as int

    e = StreamEngine(causal, 4, tactics={np.int64(2): {"focal_window_rows": np.int64(64), "attn_keys": np.int32(64)}})
    assert e.runner.fixed == {2: {"focal_window_rows": 64, "attn_keys": 64}}
    assert all(type(v) is int for v in e.runner.fixed[2].values())


@pytest.mark.parametrize("name,value,kind", [("FASTFOCAL_PDL", "off", "flag"), ("FASTFOCAL_LARGE_GEMM", "yes", "flag"),
                                             ("FASTFOCAL_PDL", "maybe", "bad"), ("FASTFOCAL_FOCAL_WINDOW_ROWS", "abc", "bad"),
                                             ("FASTFOCAL_SKINNY_ROWS", "16.0", "bad"), ("FASTFOCAL_FOCAL_WINDOW_ROWS", "-5", "bad")])
def test_environment_switches_parse_or_name_the_variable(monkeypatch, name, value, kind):
    """On/off switches take 1/true/yes/on and 0/false/no/off (FASTFOCAL_PDL=off was on); a bad
    value is a ValueError naming the variable (an int() traceback at import, or a guess, before)."""
    monkeypatch.setenv(name, value)
    if kind == "flag":
        assert _common.env_flag(name, not (value in ("yes",))) == (value == "yes")
        return
    with pytest.raises(ValueError, match=name):
        if name in ("FASTFOCAL_PDL",):
            _common.env_flag(name, False)
        else:
            _common.env_int(name, 16, lo=0 if name == "FASTFOCAL_SKINNY_ROWS" else 1)
