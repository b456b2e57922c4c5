"""The CPU forms of the streaming ops (fastfocal.cpu) against the float64 references: outputs
close, new state bit-equal to the reference's, untouched slots unchanged; rows gathered by
idx or used in place (idx None); fresh and wrapped rows; one memo shared by several layers.
And the pipeline's idx None path (every slot in order) against explicit slot indices."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "kernels"))
from kernel_checks import assert_close, assert_equal, f64  # noqa: E402

from fastfocal import cpu, ops  # noqa: E402
from fastfocal.kernels.attention import rel_attention_ref  # noqa: E402
from fastfocal.kernels.convnext import dwconv_layer_norm_ref  # noqa: E402
from fastfocal.kernels.focal_context import focal_context_ref, ring_len  # noqa: E402

NB, MD, CHUNK = 320, 800, 4
TOLS = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _attn_params(H, d, dtype, g):
    return [t.to(dtype) for t in (torch.randn(8, d, generator=g) * 0.3, torch.randn(8, generator=g) * 0.3,
                                  torch.randn(1, H, 1, 1, generator=g), torch.randn(NB, H, generator=g))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("starts,rows,T", [((0,), None, 300), ((0, 0, 0), None, 600), ((0, 0), [2, 0], 65),
                                           ((520,), None, 300), ((37, 37), None, 270), ((0, 520, 37), None, 300),
                                           ((600, 8), [1, 3], 129)])
def test_attention_long_equals_reference(dtype, starts, rows, T):
    """Offline segments (T > MAX_STEP_FRAMES, several query blocks): rows fresh (the ring left
    out), wrapped, part-filled, sharing a start or not; two layers share one memo. fp32 is
    bit-equal to the fp32 reference, both dtypes close to float64; rings bit-equal."""
    H, d, R, S = 4, 16, 508, 4
    g = torch.Generator().manual_seed(T + sum(starts))
    idx = None if rows is None else torch.tensor(rows)
    B = len(starts)
    if idx is None:
        S = B
    start = torch.tensor(starts)
    ref_rows = torch.arange(S) if idx is None else idx
    layers = [_attn_params(H, d, dtype, g) for _ in range(2)]
    layers[1][3] = layers[0][3]
    memo = {}
    for li, p in enumerate(layers):
        kr, vr = (torch.randn(S, H, R, d, generator=g).to(dtype) for _ in range(2))
        kr_ref, vr_ref = kr.clone(), vr.clone()
        kr64, vr64 = kr.double(), vr.double()
        qkv = torch.randn(B, T, 3 * H * d, generator=g).to(dtype)
        y = torch.randn(B, T, H * d, generator=g).to(dtype)
        got = cpu.rel_attention_long(qkv, y, *p, H, start, CHUNK, R + CHUNK, NB, MD, kr, vr, idx, memo)
        want = rel_attention_ref(*f64(qkv, y), *f64(*p), H, start, CHUNK, R + CHUNK, NB, MD, kr64, vr64, ref_rows)
        assert got.dtype == dtype
        assert_close(f"layer {li}", got, want, dtype)
        same = rel_attention_ref(qkv, y, *p, H, start, CHUNK, R + CHUNK, NB, MD, kr_ref, vr_ref, ref_rows)
        if dtype == torch.float32 and set(starts) == {0}:  # fresh ring left out: SDPA blocks the keys otherwise
            assert_close(f"layer {li} vs fp32 reference", got, same, dtype)
        elif dtype == torch.float32:
            assert torch.equal(got, same), f"layer {li}: not bit-equal to the fp32 reference"
        assert_equal(f"k ring layer {li}", kr, kr_ref)
        assert_equal(f"v ring layer {li}", vr, vr_ref)
    n_blocks = -(-T // 256)
    assert len(memo) == n_blocks  # each block's bias built once for both layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bf16-as-fp32"])
@pytest.mark.parametrize("S,rows,H,d,R,T", [(3, None, 4, 32, 28, 4), (4, [2, 0], 4, 32, 28, 4),
                                            (1, None, 16, 64, 508, 4), (2, [1], 2, 16, 20, 8)])
def test_attention_step_equals_reference(dtype, S, rows, H, d, R, T, monkeypatch):
    """Several steps past the ring length, rows at different positions (one fresh), two
    layers per step sharing one memo, each with its own rings and gate weights.
    bf16-as-fp32: bf16 rings on a CPU without native bf16 (the matmuls in fp32)."""
    if dtype == "bf16-as-fp32":
        monkeypatch.setitem(cpu._NATIVE, torch.bfloat16, False)
        dtype = torch.bfloat16
    g = torch.Generator().manual_seed(S * 100 + R)
    idx = None if rows is None else torch.tensor(rows)
    B = S if idx is None else len(rows)
    layers = [_attn_params(H, d, dtype, g) for _ in range(2)]
    layers[1][3] = layers[0][3]  # one relative embedding for all layers, as in the model
    rings = [[(torch.randn(S, H, R, d, generator=g)).to(dtype) for _ in range(2)] for _ in layers]
    untouched = [i for i in range(S) if idx is not None and i not in rows]
    before = [[r[untouched].clone() for r in rr] for rr in rings]
    start = torch.arange(B) * (R + 8)  # row 0 fresh, the others mid-stream and wrapped
    ref_rows = torch.arange(S) if idx is None else idx
    for step in range(3):
        memo = {}
        for li, (p, (kr, vr)) in enumerate(zip(layers, rings)):
            qkv = torch.randn(B, T, 3 * H * d, generator=g).to(dtype)
            y = torch.randn(B, T, H * d, generator=g).to(dtype)
            kr64, vr64 = kr.double(), vr.double()
            want = rel_attention_ref(*f64(qkv, y), *f64(*p), H, start, CHUNK, R + CHUNK, NB, MD, kr64, vr64, ref_rows)
            got = cpu.rel_attention_step(qkv, y, *p, H, start, CHUNK, R + CHUNK, NB, MD, kr, vr, idx, memo)
            assert got.dtype == dtype
            assert_close(f"step {step} layer {li}", got, want, dtype)
            assert_equal(f"k ring step {step} layer {li}", kr, kr64.to(dtype))  # new keys are copies
            assert_equal(f"v ring step {step} layer {li}", vr, vr64.to(dtype))
        assert len(memo) == 1  # the position bias was built once for both layers
        assert_close("a layer with its own embedding", cpu.rel_attention_step(
            qkv, y, *layers[1][:3], layers[1][3] * 2, H, start + T, CHUNK, R + CHUNK, NB, MD, kr.clone(), vr.clone(), idx, memo),
            rel_attention_ref(*f64(qkv, y), *f64(*layers[1][:3], layers[1][3] * 2), H, start + T, CHUNK, R + CHUNK, NB, MD,
                              kr.double(), vr.double(), ref_rows), dtype)
        start = start + T
    for rr, bb in zip(rings, before):
        for r, b in zip(rr, bb):
            assert_equal("untouched rows", r[untouched], b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,rows,T,starts", [
    (1, None, 4, [0]), (1, None, 4, [30]), (1, None, 4, [203]),  # fresh / inside the window / wrapped
    (3, None, 4, [0, 0, 0]), (3, None, 4, [0, 8, 97]),  # one phase (slices) / several (gathers)
    (4, [3, 1], 4, [61, 61]), (4, [3, 1], 4, [0, 12]), (2, None, 37, [0, 70]), (1, None, 70, [5])])
def test_focal_stream_equals_reference(dtype, S, rows, T, starts):
    g = torch.Generator().manual_seed(7 * S + T + starts[-1])
    C, ks = 24, [3, 5, 40]
    idx = None if rows is None else torch.tensor(rows)
    B = S if idx is None else len(rows)
    ws = [(torch.randn(C, 1, k, generator=g) / k ** 0.5).to(dtype) for k in ks]
    bs = [(torch.randn(C, generator=g) * 0.1).to(dtype) for _ in ks]
    caches = [torch.randn(S, C, ring_len(k), generator=g).to(dtype) for k in ks]
    untouched = [i for i in range(S) if idx is not None and i not in rows]
    before = [c[untouched].clone() for c in caches]
    ref_rows = torch.arange(S) if idx is None else idx
    start = torch.tensor(starts)
    for step in range(3):
        ctx = torch.randn(B, T, C, generator=g).to(dtype)
        gates = torch.randn(B, T, 3, generator=g).to(dtype)
        c64, same = [c.double() for c in caches], [c.clone() for c in caches]
        want = focal_context_ref(*f64(ctx, gates), f64(*ws), f64(*bs), True, c64, ref_rows, start)
        focal_context_ref(ctx, gates, ws, bs, True, same, ref_rows, start)  # same dtype: the same ops
        got = cpu.focal_context_stream(ctx, gates, ws, bs, caches, idx, start)
        assert_close(f"focal step {step}", got, want, dtype, rel=TOLS[dtype])
        for lvl, (c, r, r64) in enumerate(zip(caches, same, c64)):
            # level 0 rings hold input frames (copies); deeper levels the level below's
            # output, which the CPU form keeps in fp32 until it is stored (bf16: rounded once)
            if lvl == 0 or dtype == torch.float32:
                assert_equal(f"ring level {lvl} step {step}", c, r)
            assert_close(f"ring level {lvl} step {step} vs float64", c, r64, dtype, rel=TOLS[dtype])
        start = start + T
    for c, b in zip(caches, before):
        assert_equal("untouched ring rows", c[untouched], b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,rows,T", [(1, None, 4), (4, [3, 1], 4), (2, None, 13)])
def test_dwconv_layer_norm_stream_equals_reference(dtype, S, rows, T):
    g = torch.Generator().manual_seed(11 * S + T)
    C, K = 40, 7
    idx = None if rows is None else torch.tensor(rows)
    B = S if idx is None else len(rows)
    w, b = (torch.randn(C, 1, K, generator=g) / 3).to(dtype), (torch.randn(C, generator=g) * 0.1).to(dtype)
    lw, lb = (1 + 0.1 * torch.randn(C, generator=g)).to(dtype), (0.1 * torch.randn(C, generator=g)).to(dtype)
    cache = torch.randn(S, C, K - 1, generator=g).to(dtype)
    untouched = [i for i in range(S) if idx is not None and i not in rows]
    before = cache[untouched].clone()
    ref_rows = torch.arange(S) if idx is None else idx
    for step in range(3):
        x = torch.randn(B, T, C, generator=g).to(dtype)
        c64 = cache.double()
        want = dwconv_layer_norm_ref(*f64(x, w, b, lw, lb), 1e-6, True, c64, ref_rows)
        got = cpu.dwconv_layer_norm_stream(x, w, b, lw, lb, 1e-6, cache, idx)
        assert got.dtype == dtype
        assert_close(f"dwconv+LN step {step}", got, want, dtype, rel=TOLS[dtype])
        assert_equal(f"cache step {step}", cache, c64.to(dtype))  # input frames: copies
    assert_equal("untouched cache rows", cache[untouched], before)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,T,k,exact", [(1, 4, 7, False), (1, 1, 18, False), (2, 2, 14, False),  # matmul form
                                         (1, 4, 7, True), (1, 5, 7, False), (3, 4, 3, False)])  # the conv
def test_depthwise_small_steps_equal_float64(B, T, k, exact, bias):
    g = torch.Generator().manual_seed(B * 100 + T * 10 + k)
    C = 40
    xp = torch.randn(C, B, k - 1 + T, generator=g).transpose(0, 1)  # non-contiguous, as the rings hand it
    w = torch.randn(C, 1, k, generator=g) / k ** 0.5
    b = torch.randn(C, generator=g) if bias else None
    want = torch.nn.functional.conv1d(xp.double(), w.double(), None if b is None else b.double(), groups=C)
    got = cpu._depthwise(xp, w, b, exact)
    assert got.shape == (B, C, T) and got.dtype == torch.float32
    assert_close("depthwise", got, want, torch.float32, rel=1e-6)
    if exact:  # the float32 model keeps the library conv, bit for bit
        assert torch.equal(got, torch.nn.functional.conv1d(xp, w, b, groups=C))


def test_ops_take_the_cpu_forms_unless_forced_to_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "focal_context_stream", lambda *a: calls.append("cpu"))
    C, ks = 8, [3, 5, 9]
    args = (torch.randn(1, 4, C), torch.randn(1, 4, 3), [torch.randn(C, 1, k) for k in ks], [torch.randn(C) for _ in ks], True,
            [torch.zeros(1, C, ring_len(k)) for k in ks], None, torch.tensor([0]))
    ops.focal_context(*args)
    assert calls == ["cpu"]
    monkeypatch.setenv("FASTFOCAL_BACKEND", "torch")
    out = ops.focal_context(*args)  # the reference, with idx None read as every row
    assert calls == ["cpu"] and out.shape == (1, 4, C)


def test_any_rows():
    assert not ops.any_rows(None) and not ops.any_rows(torch.tensor([False, False]))
    assert ops.any_rows(torch.tensor([False, True]))


def test_pipeline_in_place_rows_equal_explicit_slots(causal):
    """idx None (every slot in order, state used in place) against the same slots through
    an index that is not in order, and against one stream alone."""
    from fastfocal.pipeline import Pipeline

    model = causal.model
    g = torch.Generator().manual_seed(3)
    sig = (torch.randn(2, 1280 * 5, generator=g) * 0.3)
    a, b = Pipeline(model, "full", 2), Pipeline(model, "full", 2)
    perm = torch.tensor([1, 0])
    assert a._span(torch.arange(2)) == (0, 2) and a._span(perm) is None
    with torch.inference_mode():
        for i in range(5):
            x = sig[:, i * 1280:(i + 1) * 1280]
            ta, aa, _ = a.step(x, torch.arange(2))
            tb, ab, _ = b.step(x[perm], perm)
            assert torch.equal(ta, tb[perm]) and torch.allclose(aa, ab[perm], atol=1e-6)
    with pytest.raises(ValueError, match="every one of the 2 slots"):
        a.run(sig[:1, :1280], None)  # one row for two slots: refused, never broadcast into the state
    for sa, sb in zip(a.states.values(), b.states.values()):
        for x, y in zip(sa.tensors(), sb.tensors()):
            assert torch.allclose(x.float(), y.float(), atol=1e-5)


@pytest.mark.parametrize("T,forced,want", [(4, False, "kernel"), (64, False, "kernel"), (65, False, "ref"),
                                           (2048, False, "ref"), (2048, True, "kernel")])
def test_long_focal_runs_take_the_reference_on_gpu(monkeypatch, T, forced, want):
    """On a GPU the focal kernel serves streaming steps; offline-length runs take the
    reference's cuDNN convs (measured faster there) unless FASTFOCAL_BACKEND=triton."""
    from fastfocal.kernels import focal_context as focal

    calls = []
    monkeypatch.setattr(ops, "use_triton", lambda x: True)
    monkeypatch.setattr(focal, "focal_context", lambda *a: calls.append("kernel"))
    monkeypatch.setattr(focal, "focal_context_ref", lambda *a: calls.append("ref"))
    if forced:
        monkeypatch.setenv("FASTFOCAL_BACKEND", "triton")
    C, ks = 8, [3, 5]
    ops.focal_context(torch.randn(1, T, C), torch.randn(1, T, 3), [torch.randn(C, 1, k) for k in ks],
                      [torch.randn(C) for _ in ks], False)
    assert calls == [want]



_MMAPPED = """
import ctypes, sys, torch, fastfocal
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
codec = fastfocal.random_init(sys.argv[1], device="cpu")
before = libc.mallinfo2().hblkhd
t = torch.empty(64 << 20, dtype=torch.uint8)  # an activation above glibc's largest mmap threshold
print(fastfocal.cpu.keep_freed_memory(), libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.parametrize("malloc", ["", "system"])
def test_cpu_models_keep_freed_memory(malloc):
    """Building a CPU model turns glibc's per-allocation mmap off, so a 64 MB activation comes
    from the heap (reused after free) rather than a fresh mapping that page-faults and is
    zeroed on every call. FASTFOCAL_MALLOC=system keeps the defaults: that block is mmapped."""
    import platform
    import subprocess
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    env = {**os.environ, "FASTFOCAL_MALLOC": malloc}
    r = subprocess.run([sys.executable, "-c", _MMAPPED, str(Path(__file__).parent / "data/tiny_causal/config.json")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    applied, mapped = r.stdout.split()
    if malloc == "system":
        assert applied == "False" and int(mapped) >= 64 << 20, r.stdout
    else:
        assert applied == "True" and int(mapped) == 0, r.stdout
