"""Gated relative-position attention kernel vs the float64 reference (which builds the bias
and mask explicitly): offline causal and full, long inputs over several query blocks, and
streaming steps reading and writing the K/V ring of slots picked by an index."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, assert_close, assert_equal, f64

from fastfocal.kernels import attention as attention_module
from fastfocal.kernels.attention import bucket_lut, rel_attention, rel_attention_ref, relative_bucket_ref

NB, MD, CHUNK = 320, 800, 4


def params(H, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gw = torch.randn(8, d, generator=g) * 0.3
    gb = torch.randn(8, generator=g) * 0.3
    gc = torch.randn(1, H, 1, 1, generator=g)
    emb = torch.randn(NB, H, generator=g)
    return [t.to(DEVICE, dtype) for t in (gw, gb, gc, emb)]


def inputs(B, T, H, d, dtype, seed):
    g = torch.Generator().manual_seed(100 + seed)
    qkv = torch.randn(B, T, 3 * H * d, generator=g)
    y = torch.randn(B, T, H * d, generator=g)
    return qkv.to(DEVICE, dtype), y.to(DEVICE, dtype)


def ref64(qkv, y, p, H, start, window, kr=None, vr=None, idx=None):
    return rel_attention_ref(*f64(qkv, y), *f64(*p), H, start, CHUNK, window, NB, MD, kr, vr, idx)


def test_bucket_lut_is_the_reference():
    rel = torch.arange(-40000, 40001, device=DEVICE)
    lut = bucket_lut(NB, MD, DEVICE)
    assert_equal("buckets", lut[rel.clamp(-MD, MD) + MD].long(), relative_bucket_ref(rel, NB, MD))


def test_bias_table_follows_the_embedding():
    """The kernel's bias comes from a table built once per embedding: changing the embedding
    in place must rebuild it (a stale table would give the old bias)."""
    p = params(4, 32, torch.float32)
    qkv, y = inputs(2, 37, 4, 32, torch.float32, 0)
    start = torch.zeros(2, dtype=torch.long, device=DEVICE)
    rel_attention(qkv, y, *p, 4, start, CHUNK, 32, NB, MD)
    p[3].mul_(-3.0)
    out = rel_attention(qkv, y, *p, 4, start, CHUNK, 32, NB, MD)
    assert_close("after the embedding changed", out, ref64(qkv, y, p, 4, start, 32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,d,window", [(2, 1, 4, 32, 32), (2, 4, 4, 32, 32), (2, 37, 3, 24, 32),
                                            (1, 100, 2, 32, 24), (2, 37, 4, 32, None), (1, 100, 2, 16, None)])
def test_offline(dtype, B, T, H, d, window):
    p = params(H, d, dtype)
    qkv, y = inputs(B, T, H, d, dtype, 0)
    start = torch.zeros(B, dtype=torch.long, device=DEVICE)
    out = rel_attention(qkv, y, *p, H, start, CHUNK, window, NB, MD)
    assert_close("attention", out, ref64(qkv, y, p, H, start, window), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,d,R,steps", [(3, 4, 4, 32, 28, 12), (2, 37, 2, 32, 28, 2), (2, 70, 2, 16, 20, 2), (1, 4, 16, 64, 508, 2)])
def test_stream_steps(dtype, B, T, H, d, R, steps):
    """Steps past the ring length (it wraps), rows at different positions, some fresh."""
    S = B + 2
    p = params(H, d, dtype)
    g = torch.Generator().manual_seed(5)
    kr = torch.randn(S, H, R, d, generator=g).to(DEVICE, dtype)
    vr = torch.randn(S, H, R, d, generator=g).to(DEVICE, dtype)
    idx = torch.randperm(S, generator=g)[:B].to(DEVICE)
    untouched = [i for i in range(S) if i not in idx.tolist()]
    before = kr[untouched].clone(), vr[untouched].clone()
    start = torch.arange(B, device=DEVICE) * (R + 8)  # row 0 starts fresh, others mid-stream
    for step in range(steps):
        qkv, y = inputs(B, T, H, d, dtype, step)
        kr_ref, vr_ref = kr.clone(), vr.clone()
        want = ref64(qkv, y, p, H, start, R + CHUNK, kr_ref.to(torch.float64), vr_ref.to(torch.float64), idx)
        out = rel_attention(qkv, y, *p, H, start, CHUNK, R + CHUNK, NB, MD, kr, vr, idx)
        assert_close(f"attention step {step}", out, want, dtype)
        rel_attention_ref(qkv, y, *p, H, start, CHUNK, R + CHUNK, NB, MD, kr_ref, vr_ref, idx)
        assert_equal(f"k ring step {step}", kr, kr_ref)  # new keys are copied, bit for bit
        assert_equal(f"v ring step {step}", vr, vr_ref)
        start = start + T
    assert_equal("untouched k rows", kr[untouched], before[0])
    assert_equal("untouched v rows", vr[untouched], before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(3, 4, 4, 32, 28, 12), (1, 4, 16, 64, 508, 2)])
def test_stream_steps_32_key_blocks(monkeypatch, dtype, case):
    """The streaming key block that fastfocal.tactics times against the default 64: the same
    results and ring writes (the key loop's tail block and the ring wrap at 32)."""
    monkeypatch.setattr(attention_module, "STREAM_KEYS", 32)
    test_stream_steps(dtype, *case)


def test_stream_equals_offline():
    """Feeding 4-frame steps through the ring gives the offline causal result."""
    H, d, R = 2, 16, 12
    p = params(H, d, torch.float32)
    qkv, y = inputs(1, 40, H, d, torch.float32, 3)
    zero = torch.zeros(1, dtype=torch.long, device=DEVICE)
    offline = rel_attention(qkv, y, *p, H, zero, CHUNK, R + CHUNK, NB, MD)
    kr = torch.zeros(1, H, R, d, device=DEVICE)
    vr = torch.zeros_like(kr)
    outs = [rel_attention(qkv[:, a:a + 4], y[:, a:a + 4], *p, H, zero + a, CHUNK, R + CHUNK, NB, MD, kr, vr, zero)
            for a in range(0, 40, 4)]
    assert_close("stream vs offline", torch.cat(outs, 1), offline, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_full_size(dtype):
    H, d, R, B, S = 16, 64, 508, 32, 40
    p = params(H, d, dtype)
    kr = torch.randn(S, H, R, d, device="cuda", dtype=dtype)
    vr = torch.randn_like(kr)
    idx = torch.randperm(S, device="cuda")[:B]
    start = torch.randint(0, 5000, (B,), device="cuda") * 4
    for step in range(3):
        qkv, y = inputs(B, 4, H, d, dtype, step)
        want = ref64(qkv, y, p, H, start, 512, kr.to(torch.float64), vr.to(torch.float64), idx)
        assert_close("stream", rel_attention(qkv, y, *p, H, start, CHUNK, 512, NB, MD, kr, vr, idx), want, dtype)
        start = start + 4
    for T, window in ((2048, 512), (1500, None)):
        qkv, y = inputs(2, T, H, d, dtype, 7)
        zero = torch.zeros(2, dtype=torch.long, device="cuda")
        assert_close(f"offline {T}", rel_attention(qkv, y, *p, H, zero, CHUNK, window, NB, MD), ref64(qkv, y, p, H, zero, window), dtype)


@pytest.mark.gpu
def test_gpu_4096_streams():
    """The largest streaming batch: 4096 x 16 (row, head) programs; rows checked at both ends."""
    H, d, R, B = 16, 64, 508, 4096
    dtype = torch.bfloat16
    p = params(H, d, dtype)
    kr = torch.randn(B, H, R, d, device="cuda", dtype=dtype)
    vr = torch.randn_like(kr)
    idx = torch.arange(B, device="cuda").flip(0)
    start = torch.randint(0, 5000, (B,), device="cuda") * 4
    qkv, y = inputs(B, 4, H, d, dtype, 0)
    rows = torch.tensor([0, 1, B - 1], device="cuda")
    sub = idx[rows]
    want = ref64(qkv[rows], y[rows], p, H, start[rows], 512, kr[sub].double(), vr[sub].double(), torch.arange(3, device="cuda"))
    got = rel_attention(qkv, y, *p, H, start, CHUNK, 512, NB, MD, kr, vr, idx)
    assert_close("rows", got[rows], want, dtype)
