"""Residual add + LayerNorm / DynamicTanh (+ GELU) kernel."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, assert_close, assert_equal, f64, rand

from fastfocal.kernels.norm import norm, norm_ref

SHAPES = [(1, 1, 12), (2, 4, 96), (2, 37, 12), (1, 37, 1024), (3, 5, 145)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["ln", "ln_res", "ln_gelu", "dyt", "dyt_res"])
def test_norm(dtype, shape, kind):
    C = shape[-1]
    h = rand(*shape, dtype=dtype, device=DEVICE, scale=2.0) + 0.5  # a mean to remove
    hb = rand(C, dtype=dtype, device=DEVICE)
    res = rand(*shape, dtype=dtype, device=DEVICE) if kind.endswith("res") else None
    if kind.startswith("ln"):
        w, b = rand(C, dtype=dtype, device=DEVICE) + 1, rand(C, dtype=dtype, device=DEVICE)
        kw = dict(weight=w, bias=b, eps=1e-5)
        kw64 = dict(weight=w.double(), bias=b.double(), eps=1e-5)
    else:
        alpha = torch.tensor([0.7], device=DEVICE, dtype=dtype)
        kw, kw64 = dict(alpha=alpha), dict(alpha=alpha.double())
    gelu = kind == "ln_gelu"
    got = norm(h, res=res, h_bias=hb, act_gelu=gelu, **kw)
    want = norm_ref(*f64(h), res=f64(res)[0], h_bias=hb.double(), act_gelu=gelu, **kw64)
    if res is None:
        assert_close(kind, got, want, dtype)
    else:
        assert_close(kind + " stream", got[0], want[0], dtype)
        assert_close(kind + " normed", got[1], want[1], dtype)


def test_residual_stream_in_place():
    """x' may overwrite h (the matmul output): out_proj's buffer becomes the stream."""
    h, res = rand(2, 37, 96, device=DEVICE), rand(2, 37, 96, device=DEVICE)
    w, b = rand(96, device=DEVICE), rand(96, device=DEVICE)
    want = norm_ref(h.double(), w.double(), b.double(), 1e-5, res=res.double())
    x, y = norm(h, w, b, 1e-5, res=res, x_out=h)
    assert x.data_ptr() == h.data_ptr()
    assert_close("stream", x, want[0])
    assert_close("normed", y, want[1])


def test_fp32_stream_is_exact_sum():
    """fp32: the stored stream is exactly res + h (one rounding, like the reference)."""
    h, res = rand(3, 4, 96, device=DEVICE), rand(3, 4, 96, device=DEVICE)
    x, _ = norm(h, alpha=torch.tensor([0.5], device=DEVICE), res=res)
    assert_equal("stream", x, res + h)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sizes(dtype):
    for shape in [(4096, 4, 1024), (8, 2048, 1024), (8, 500, 256)]:
        h, res = rand(*shape, dtype=dtype, device="cuda"), rand(*shape, dtype=dtype, device="cuda")
        w, b = rand(shape[-1], dtype=dtype, device="cuda"), rand(shape[-1], dtype=dtype, device="cuda")
        got = norm(h, w, b, 1e-5, res=res)
        want = norm_ref(*f64(h, w, b), 1e-5, res=res.double())
        assert_close("normed", got[1], want[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("src_shape,P,with_idx", [((3, 7, 40), 3, True), ((2, 300, 33), 200, False), ((1, 4, 1), 4, True)])
def test_norm_writes_a_conv_cache_on_the_side(dtype, src_shape, P, with_idx):
    """tail: the programs of a norm launch also copy the last P frames of each src row into its
    cache row (a causal conv's deferred state write): rows idx or b, the other rows untouched,
    the norm's output unchanged; more frames than the launch has programs loop over them."""
    from fastfocal.kernels.norm import tail_copy_ref

    h = rand(1, 2, 16, dtype=dtype, device=DEVICE)  # one program
    w, b = rand(16, dtype=dtype, device=DEVICE) + 1, rand(16, dtype=dtype, device=DEVICE)
    B, T, C = src_shape
    src = rand(B, T, C, dtype=dtype, device=DEVICE)
    S = B + 2 if with_idx else B
    cache = rand(S, P, C, dtype=dtype, device=DEVICE)
    idx = torch.arange(1, B + 1, device=DEVICE) if with_idx else None  # no row on its own slot
    want = cache.clone()
    tail_copy_ref((src, want, idx))
    rows = idx.tolist() if with_idx else list(range(B))
    for j, r in enumerate(rows):  # the reference itself, against plain indexing
        assert torch.equal(want[r], src[j, T - P:])
    got = norm(h, w, b, 1e-5, act_gelu=True, tail=(src, cache, idx))
    assert_equal("cache", cache, want)
    assert_equal("normed", got, norm(h, w, b, 1e-5, act_gelu=True))
    with pytest.raises(ValueError, match="tail copy"):
        norm(h, w, b, 1e-5, tail=(src, torch.zeros(S, T + 1, C, dtype=dtype, device=DEVICE), idx))
