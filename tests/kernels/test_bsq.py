"""BSQ kernel: normalise + sign + token packing + codes in one pass; code projection from
codes or straight from tokens."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, assert_close, assert_equal, f64, rand

from fastfocal.kernels.bsq import bsq, bsq_codes_ref, bsq_quantize_ref, bsq_ref, code_proj, code_proj_ref


def latents(shape, dtype):
    x = rand(*shape, dtype=dtype, device=DEVICE)
    x.view(-1)[::7] = 0  # zero counts as negative
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 11), (2, 4, 12), (2, 37, 13), (3, 5, 16), (1, 3, 33)])
def test_bsq(dtype, shape):
    x = latents(shape, dtype)
    lats, toks, codes = bsq(x)
    lr, tr, cr = bsq_ref(x)
    assert_close("lats", lats, bsq_ref(x.double())[0], dtype)
    # tokens and codes follow the stored latents exactly
    t2, c2 = bsq_quantize_ref(lats)
    assert_equal("toks", toks, t2)
    assert_equal("codes", codes, c2)
    if dtype == torch.float32:
        assert_equal("toks vs reference", toks, tr)
        assert_equal("codes vs reference", codes, cr)
    # quantize only (lats given), normalise only
    _, t3, c3 = bsq(lr, normalize=False)
    assert_equal("toks of given lats", t3, tr)
    assert_equal("codes of given lats", c3, cr)
    assert bsq(x, quantize=False)[1] is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,O", [(1, 12, 32), (4, 12, 256), (37, 13, 96), (37, 16, 1024), (5, 11, 145)])
def test_code_proj(dtype, N, D, O):
    toks = torch.randint(0, 2 ** D, (2, N), device=DEVICE)
    w = rand(O, D, dtype=dtype, device=DEVICE)
    b = rand(O, dtype=dtype, device=DEVICE)
    codes = bsq_codes_ref(toks, D, dtype)
    want = code_proj_ref(*f64(codes, w, b))
    assert_close("from tokens", code_proj(toks, w, b, D, dtype), want, dtype)
    assert_close("from codes", code_proj(codes, w, b), want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sizes(dtype):
    x = rand(4096, 4, 12, dtype=dtype, device="cuda")
    lats, toks, codes = bsq(x)
    t2, c2 = bsq_quantize_ref(lats)
    assert_equal("toks", toks, t2)
    assert_equal("codes", codes, c2)
    toks = torch.randint(0, 4096, (8, 2048), device="cuda")
    w, b = rand(256, 12, dtype=dtype, device="cuda"), rand(256, dtype=dtype, device="cuda")
    assert_close("proj", code_proj(toks, w, b, 12, dtype), code_proj_ref(toks, w.double(), b.double(), 12, torch.float64), dtype)
