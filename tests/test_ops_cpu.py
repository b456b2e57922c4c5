"""The CPU matmul on reordered weights (ops.matmul): same results as F.linear, and the cache
follows the weight when it changes in place, is swapped, or is a view."""
import pytest
import torch
import torch.nn.functional as F

from fastfocal import cpu, ops


@pytest.fixture
def wx():
    g = torch.Generator().manual_seed(0)
    return torch.randn(48, 40, generator=g), torch.randn(48, generator=g), torch.randn(5, 4, 40, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_equals_linear(wx, dtype):
    w, b, x = (t.to(dtype) for t in wx)
    got, want = ops.matmul(x, w, b), F.linear(x, w, b)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


def test_cache_follows_in_place_changes_swaps_and_views(wx):
    w, b, x = wx
    ops.matmul(x, w, b)  # cached
    w.mul_(2)  # in place: version counter moves
    assert torch.allclose(ops.matmul(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    p = torch.nn.Parameter(w.clone(), requires_grad=False)
    ops.matmul(x, p, b)
    p.data = torch.randn_like(w)  # same object, new storage
    assert torch.allclose(ops.matmul(x, p, b), F.linear(x, p, b), rtol=1e-5, atol=1e-4)
    sq = torch.randn(40, 40)
    xt = x[..., :40]
    for v in (sq, sq.t(), sq[:32]):  # views of one base are cached apart
        assert torch.allclose(ops.matmul(xt, v), F.linear(xt, v), rtol=1e-5, atol=1e-4)


def test_switch_off_gives_plain_linear(wx, monkeypatch):
    w, b, x = wx
    monkeypatch.setenv("FASTFOCAL_CPU_PACK", "0")
    assert torch.equal(ops.matmul(x, w, b), F.linear(x, w, b))
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        wi = w.clone()
    monkeypatch.setenv("FASTFOCAL_CPU_PACK", "1")
    assert torch.equal(ops.matmul(x, wi, b), F.linear(x, wi, b))


@pytest.mark.parametrize("route", ["fp16-gemm", "fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_dtype_this_cpu_cannot_pack_computes_in_float32(wx, monkeypatch, dtype, route):
    """oneDNN's bf16 reorder needs AVX-512 or AVX-NE-CONVERT: the probe must say what the op does
    here. Where a dtype cannot be packed, the matmul (and its GELU / residual post-ops) runs in
    fp32 on FBGEMM's fp16 weights (exact for these) or on the weight packed as fp32, rounded
    once: within half a unit in the last place of the float64 result. A weight beyond fp16's
    range takes the fp32 route."""
    w = torch.randn(8, 8).to(dtype)
    try:
        torch.ops.mkldnn._reorder_linear_weight(w, 2)
        packs = True
    except (RuntimeError, AttributeError):
        packs = False
    assert cpu.native(dtype) == packs
    monkeypatch.setitem(cpu._NATIVE, dtype, False)
    if route == "fp16-gemm" and not cpu.fp16_weight_gemm():
        pytest.skip("this torch build has no FBGEMM fp16 GEMM")
    monkeypatch.setattr(cpu, "_FP16_GEMM", [route == "fp16-gemm"])
    w, b, x = (t.to(dtype) for t in wx)
    res = torch.randn(5, 4, 48).to(dtype)
    huge = w.clone()
    huge[0, 0] = 2 ** 17 if dtype == torch.bfloat16 else float("inf")
    eps = torch.finfo(dtype).eps
    for wi in (w, huge):
        h = F.linear(x.double(), wi.double(), b.double())
        for got, want in ((ops.matmul(x, wi, b), h), (ops.linear_gelu(x, wi, b), F.gelu(h)),
                          (ops.linear_residual(x, wi, b, res), h + res.double())):
            assert got.dtype == dtype
            ok = (got.double() - want).abs() <= want.abs() * eps / 2 * 1.01 + 1e-5
            # one rounding of a value computed in fp32: |err| <= ulp/2 (+ fp32's own error)
            assert (ok | ~torch.isfinite(want)).all()
    keys = {k[-1] for k in ops._PACKED[w]}
    assert keys == ({"fp16-gemm"} if route == "fp16-gemm" else {torch.float32}), keys
    if route == "fp16-gemm":  # out of fp16's range: cached as unusable, computed on the fp32 weight
        assert {k[-1] for k in ops._PACKED[huge]} == {"fp16-gemm", torch.float32}
        many = torch.randn(ops.FP16_GEMM_ROWS + 1, 40).to(dtype)  # many rows: the fp32 packed weight
        h = F.linear(many.double(), w.double(), b.double())
        assert ((ops.matmul(many, w, b).double() - h).abs() <= h.abs() * eps / 2 * 1.01 + 1e-5).all()
        assert {k[-1] for k in ops._PACKED[w]} == {"fp16-gemm", torch.float32}


def test_safe_grouped_conv_follows_weight_changes():
    """bf16 grouped convs run in fp32 on CPU from a cached fp32 weight: the cache must follow."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 20, generator=g).bfloat16()
    w = torch.randn(8, 1, 5, generator=g).bfloat16()
    b = torch.randn(8, generator=g).bfloat16()

    def want():
        return F.conv1d(x.float(), w.float(), b.float(), groups=8).bfloat16()

    assert torch.equal(ops.grouped_conv1d(x, w, b, 8), want())
    w.mul_(-3)
    assert torch.equal(ops.grouped_conv1d(x, w, b, 8), want())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gelu_and_residual_post_ops_equal_the_separate_ops(wx, dtype):
    """On CPU, GELU and residual adds run as post-ops of the reordered-weight matmul."""
    from fastfocal.kernels.norm import norm_ref

    w, b, x = (t.to(dtype) for t in wx)
    g = torch.Generator().manual_seed(2)
    res = torch.randn(5, 4, 48, generator=g).to(dtype)
    lw, lb = torch.randn(48, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    alpha = torch.tensor([0.7]).to(dtype)
    h = F.linear(x.double(), w.double(), b.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def close(name, got, want):
        assert got.dtype == dtype and got.shape == want.shape, name
        err = (got.double() - want).abs().max().item()
        assert err <= tol * want.abs().max().item(), f"{name}: max err {err:.3g}"

    close("gelu", ops.linear_gelu(x, w, b), F.gelu(h))
    close("residual", ops.linear_residual(x, w, b, res), h + res.double())
    xr, y = ops.linear_residual_layer_norm(x, w, b, res, lw, lb, 1e-5)
    close("residual+LN x'", xr, h + res.double())
    close("residual+LN y", y, norm_ref(h + res.double(), lw.double(), lb.double(), 1e-5))
    xr, y = ops.linear_residual_dyt(x, w, b, res, alpha)
    close("residual+DyT y", y, torch.tanh(alpha.double() * (h + res.double())))
    close("residual with gamma (not fused)", ops.linear_residual(x, w, b, res, lw), h * lw.double() + res.double())


@pytest.mark.parametrize("B,T", [(1, 4), (1, 65), (3, 200), (80, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bf16-as-fp32"])
@pytest.mark.parametrize("pack", ["packed", "bmm"])
def test_grouped_conv_forms_equal_the_conv(B, T, dtype, pack, monkeypatch):
    """ops.grouped_conv_time_major (the CPU / long-run form) (short runs: a oneDNN matmul per group
    on its reordered weight, or with FASTFOCAL_CPU_PACK=0 one batched GEMM; for long bf16 runs
    ~64 rows at a time, whatever the chunk boundaries) against the float64 conv; fp32 long runs
    are the library conv. bf16-as-fp32: a CPU without native bf16 (all in fp32, one rounding)."""
    from fastfocal import ops
    from fastfocal.ops import grouped_conv_time_major as _grouped_conv

    monkeypatch.setenv("FASTFOCAL_CPU_PACK", "1" if pack == "packed" else "0")
    calls, packed_call = [], ops._packed_call
    monkeypatch.setattr(ops, "_packed_call", lambda *a, **k: calls.append(1) or packed_call(*a, **k))
    # short runs take the per-group matmul; long runs too in native bf16 (64 rows at a time)
    short = T <= 64 or (dtype == torch.bfloat16 and cpu.native(torch.bfloat16))

    if dtype == "bf16-as-fp32":
        monkeypatch.setitem(cpu._NATIVE, torch.bfloat16, False)
        dtype = torch.bfloat16

    g = torch.Generator().manual_seed(B * 1000 + T)
    C, G, k = 64, 4, 9
    xp = torch.randn(B, C, T + k - 1, generator=g)
    w = torch.randn(C, C // G, k, generator=g) / (C // G * k) ** 0.5
    b = torch.randn(C, generator=g)
    want = F.conv1d(xp.double(), w.double(), b.double(), groups=G)
    got = _grouped_conv(xp.to(dtype).transpose(1, 2).contiguous(), w.to(dtype), b.to(dtype), G).transpose(1, 2)
    assert got.shape == (B, C, T) and got.dtype == dtype
    # bf16: inputs rounded to bf16 and one rounding of the output (the bias inside the GEMM)
    ref = F.conv1d(xp.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double(), groups=G) if dtype != torch.float32 else want
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((got.double() - ref).abs() <= tol * ref.abs() + 1e-6 * ref.abs().max()).all()
    assert bool(calls) == (pack == "packed" and short and ops._PACK_OPS), (pack, len(calls))


def test_memoised_switches_follow_every_change(monkeypatch):
    """FASTFOCAL_BACKEND and FASTFOCAL_CPU_PACK are read on every op, now through a memo keyed on
    os.environ's stored value: each set, change, re-set and unset is seen at the next call, and
    a bad value raises every time (nothing is memoised for it)."""
    from fastfocal.kernels import _common

    monkeypatch.delenv("FASTFOCAL_BACKEND", raising=False)
    assert ops.backend() == "auto"
    for v, want in (("torch", "torch"), ("TRITON", "triton"), ("torch", "torch"), ("", "auto")):
        monkeypatch.setenv("FASTFOCAL_BACKEND", v)
        assert ops.backend() == want
    monkeypatch.setenv("FASTFOCAL_BACKEND", "cuda")
    for _ in range(2):
        with pytest.raises(ValueError, match="FASTFOCAL_BACKEND must be auto, torch or triton, got 'cuda'"):
            ops.backend()
    monkeypatch.delenv("FASTFOCAL_BACKEND")
    assert ops.backend() == "auto"
    calls = []
    assert [_common.env_cached("FASTFOCAL_TEST_MEMO", lambda v: calls.append(v) or v) for _ in range(3)] == [None] * 3
    assert calls == [None]  # parsed once while unchanged
    monkeypatch.setenv("FASTFOCAL_TEST_MEMO", "a")
    assert _common.env_cached("FASTFOCAL_TEST_MEMO", lambda v: calls.append(v) or v) == "a" and calls == [None, "a"]
    # os.environ replaced by a plain mapping (mock.patch.object(os, "environ", {...})) is read as it
    # is, and the real one again after
    import os
    from unittest import mock

    assert ops.backend() == "auto"
    with mock.patch.object(os, "environ", {"FASTFOCAL_BACKEND": "torch"}):
        assert ops.backend() == "torch"
    assert ops.backend() == "auto"
    w = torch.randn(8, 8)
    x = torch.randn(2, 8)
    monkeypatch.setenv("FASTFOCAL_CPU_PACK", "0")
    assert ops._pack_dtype(x, w) is None  # off: plain F.linear
    monkeypatch.setenv("FASTFOCAL_CPU_PACK", "1")
    assert ops._pack_dtype(x, w) == (torch.float32 if ops._PACK_OPS else None)


def test_tensor_cache_lives_with_its_tensor():
    """The weight caches (packed weights, derived float32 copies) hold an entry while the tensor
    lives; it goes with the tensor, and a new tensor at a reused id never sees it."""
    import gc

    from fastfocal.kernels._common import TensorCache

    c = TensorCache()
    a = torch.randn(4)
    assert c.setdefault(a, {"x": 1}) == {"x": 1}
    assert c.setdefault(a, {}) == {"x": 1} and c[a] == {"x": 1} and len(c) == 1
    del a
    gc.collect()
    assert len(c) == 0
    seen = []
    for _ in range(50):  # ids are reused quickly: a fresh tensor must start empty
        t = torch.randn(4)
        seen.append(c.setdefault(t, {}) == {})
        c[t]["mark"] = True
        del t
    assert all(seen)
