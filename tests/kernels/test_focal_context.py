"""Focal context kernel vs the float64 reference: offline, long, and streaming steps with
rings read and written in place for rows picked by a slot index, at every ring phase."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, assert_close, assert_equal, f64

from fastfocal.kernels import focal_context as focal_context_module
from fastfocal.kernels.focal_context import focal_context, focal_context_long, focal_context_ref, ring_len


def make(B, T, C, ks, causal, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_g = len(ks) + (0 if causal else 1)
    # q | ctx | gates as one in_proj output: ctx and gates are strided views, as in the model
    h = torch.randn(B, T, 2 * C + n_g, generator=g).to(DEVICE, dtype)
    ws = [(torch.randn(C, 1, k, generator=g) / k ** 0.5).to(DEVICE, dtype) for k in ks]
    bs = [(torch.randn(C, generator=g) * 0.1).to(DEVICE, dtype) for _ in ks]
    return h[..., C:2 * C], h[..., 2 * C:], ws, bs


def rings_at_phases(B, C, ks, dtype, seed, starts):
    """Random rings for B rows picked by a slot index among B + 3 (the others must stay
    untouched), the rows' frame counts `starts[:B]`: (caches, idx, untouched slots, their
    contents, start)."""
    S = B + 3
    g = torch.Generator().manual_seed(seed)
    caches = [torch.randn(S, C, ring_len(k), generator=g).to(DEVICE, dtype) for k in ks]
    idx = torch.randperm(S, generator=g)[:B].to(DEVICE)
    untouched = [i for i in range(S) if i not in idx.tolist()]
    return caches, idx, untouched, [c[untouched].clone() for c in caches], torch.tensor(starts[:B], device=DEVICE)


def ref64(ctx, gates, ws, bs, causal, caches=None, idx=None, start=None):
    return focal_context_ref(*f64(ctx, gates), f64(*ws), f64(*bs), causal, caches, idx, start)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,W", [(2, 1, 12, 32), (3, 4, 96, 32), (3, 3, 20, 24), (2, 37, 12, 24), (1, 4, 145, 512)])
@pytest.mark.parametrize("rows_gemm", [False, True], ids=["fused", "window-rows"])
def test_causal_stream_steps(dtype, B, T, C, W, rows_gemm, monkeypatch):
    """Rows at different ring phases: fresh (0), inside the first window (frames before the
    stream's first are read from slot 0), and long past it (the ring has wrapped). window-rows:
    the window level's ring taps as a GEMM over the rows (`_window_rows_kernel`, the many-row form)."""
    monkeypatch.setattr(focal_context_module, "WINDOW_ROWS", 1 if rows_gemm else 10 ** 9)
    ks = [14, 18, W]
    caches, idx, untouched, before, start = rings_at_phases(B, C, ks, dtype, 1, [1000 + W, 0, 5])
    for step in range(3):
        ctx, gates, ws, bs = make(B, T, C, ks, True, dtype, seed=step)
        prev = [c.clone() for c in caches]
        out = focal_context(ctx, gates, ws, bs, True, caches, idx, start)
        assert_close(f"acc step {step}", out, ref64(ctx, gates, ws, bs, True, [c.to(torch.float64) for c in prev], idx, start), dtype)
        same = [c.clone() for c in prev]
        focal_context_ref(ctx, gates, ws, bs, True, same, idx, start)
        # level 0 rings hold ctx frames: a pure copy, bit for bit; deeper levels hold computed values
        assert_equal(f"level-0 ring step {step}", caches[0], same[0])
        for lvl in (1, 2):
            assert_close(f"level-{lvl} ring step {step}", caches[lvl], same[lvl], dtype)
        start = start + T
    for lvl in range(3):
        assert_equal(f"untouched slots, level {lvl}", caches[lvl][untouched], before[lvl])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,W", [(2, 100, 12, 32), (3, 70, 20, 24), (1, 300, 145, 512), (2, 33, 8, 40)])
@pytest.mark.parametrize("rings", [False, True], ids=["offline", "segment"])
def test_long_runs(dtype, B, T, C, W, rings):
    """The long-run form (every level as a Toeplitz GEMM) against float64: an offline run,
    and a segment after earlier ones with the rings at every phase (fresh, young, wrapped);
    rings updated as the reference updates them, untouched slots left alone."""
    ks = [14, 18, W]
    ctx, gates, ws, bs = make(B, T, C, ks, True, dtype, seed=4)
    if not rings:
        assert_close("acc", focal_context_long(ctx, gates, ws, bs), ref64(ctx, gates, ws, bs, True), dtype)
        return
    caches, idx, untouched, before, start = rings_at_phases(B, C, ks, dtype, 5, [5, 0, 2000 + W])
    prev = [c.clone() for c in caches]
    out = focal_context_long(ctx, gates, ws, bs, caches, idx, start)
    assert_close("acc", out, ref64(ctx, gates, ws, bs, True, [c.to(torch.float64) for c in prev], idx, start), dtype)
    same = [c.clone() for c in prev]
    focal_context_ref(ctx, gates, ws, bs, True, same, idx, start)
    assert_equal("level-0 ring", caches[0], same[0])
    for lvl in (1, 2):
        assert_close(f"level-{lvl} ring", caches[lvl], same[lvl], dtype)
    for lvl in range(3):
        assert_equal(f"untouched slots, level {lvl}", caches[lvl][untouched], before[lvl])


def test_stream_equals_one_long_run():
    """Chunks of 1, 4 and 3 frames through the rings, 130 steps past the 32-frame window,
    give what the whole signal gives offline."""
    C, ks = 12, [14, 18, 32]
    ctx, gates, ws, bs = make(1, 300, C, ks, True, torch.float32, seed=3)
    want = focal_context(ctx, gates, ws, bs, True)
    caches = [torch.zeros(2, C, ring_len(k), device=DEVICE) for k in ks]
    idx, t, got = torch.tensor([1], device=DEVICE), 0, []
    sizes = [1, 4, 3] * 100
    while t < 300:
        n = min(sizes.pop(), 300 - t)
        got.append(focal_context(ctx[:, t:t + n], gates[:, t:t + n], ws, bs, True, caches, idx, torch.tensor([t], device=DEVICE)))
        t += n
    assert_close("chunked vs offline", torch.cat(got, 1), want, rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C", [(2, 1, 12), (2, 37, 96), (1, 70, 12)])
def test_causal_offline(dtype, B, T, C):
    ctx, gates, ws, bs = make(B, T, C, [14, 18, 32], True, dtype)
    assert_close("acc", focal_context(ctx, gates, ws, bs, True), ref64(ctx, gates, ws, bs, True), dtype)


def test_offline_equals_fresh_stream():
    """Offline (no cache) is a fresh stream: the replicate rule at every level."""
    ctx, gates, ws, bs = make(2, 37, 12, [14, 18, 32], True, torch.float32)
    caches = [torch.randn(2, 12, ring_len(k), device=DEVICE) for k in (14, 18, 32)]
    idx = torch.tensor([1, 0], device=DEVICE)
    a = focal_context(ctx, gates, ws, bs, True)
    b = focal_context(ctx, gates, ws, bs, True, caches, idx, torch.zeros(2, dtype=torch.long, device=DEVICE))
    assert_close("offline vs fresh", a, b, rel=1e-6)


# full width in one dtype only: the interpreter is slow
NONCAUSAL_CASES = [(d, *s) for d in DTYPES for s in [(2, 1, 12), (2, 4, 96), (2, 37, 12)]] + [(torch.float32, 1, 70, 1024)]


@pytest.mark.parametrize("dtype,B,T,C", NONCAUSAL_CASES)
def test_noncausal(dtype, B, T, C):
    ctx, gates, ws, bs = make(B, T, C, [14, 18], False, dtype)
    assert_close("acc", focal_context(ctx, gates, ws, bs, False), ref64(ctx, gates, ws, bs, False), dtype)


def test_writes_every_output():
    """A preallocated out full of NaN: every element must be overwritten."""
    ctx, gates, ws, bs = make(3, 37, 96, [14, 18, 32], True, torch.float32)
    out = torch.full((3, 37, 96), float("nan"), device=DEVICE)
    focal_context(ctx, gates, ws, bs, True, out=out)
    assert_close("acc", out, ref64(ctx, gates, ws, bs, True))


def test_rejects_bad_input():
    ctx, gates, ws, bs = make(1, 4, 12, [14, 18, 32], True, torch.float32)
    with pytest.raises(ValueError, match="conv levels"):
        focal_context(ctx, gates, ws[:2], bs[:2], True)
    with pytest.raises(ValueError, match="cache must be a contiguous ring"):
        focal_context(ctx, gates, ws, bs, True, [torch.zeros(2, 12, k - 1, device=DEVICE) for k in (14, 18, 32)],
                      torch.zeros(1, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [256, 512, 1024])
def test_gpu_full_size_stream(dtype, C):
    B, S, ks = 64, 80, [14, 18, 512]
    caches = [torch.randn(S, C, ring_len(k), device="cuda", dtype=dtype) for k in ks]
    ref = [c.clone() for c in caches]
    idx = torch.randperm(S, device="cuda")[:B]
    start = torch.randint(0, 2000, (B,), device="cuda") * (torch.rand(B, device="cuda") > 0.2)
    for step in range(3):
        ctx, gates, ws, bs = make(B, 4, C, ks, True, dtype, seed=step)
        r64 = [c.to(torch.float64) for c in ref]
        want = ref64(ctx, gates, ws, bs, True, r64, idx, start)
        assert_close("acc", focal_context(ctx, gates, ws, bs, True, caches, idx, start), want, dtype)
        for lvl in range(3):
            assert_close(f"ring {lvl}", caches[lvl], r64[lvl], dtype)
        ref = [c.clone() for c in caches]
        start = start + 4
    ctx, gates, ws, bs = make(8, 2048, C, ks, True, dtype)
    assert_close("offline 2048", focal_context(ctx, gates, ws, bs, True), ref64(ctx, gates, ws, bs, True), dtype)
