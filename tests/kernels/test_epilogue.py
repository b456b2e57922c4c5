"""Matmul epilogue kernel: bias, scale, residual and GELU / clamp / Snake in one pass."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, assert_close, f64, rand

from fastfocal.kernels.epilogue import epilogue, epilogue_ref

SHAPES = [(1, 1, 12), (2, 4, 96), (2, 37, 12), (1, 37, 1024), (3, 5, 145)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act,res,gamma", [("gelu", False, False), ("none", True, False), ("none", True, True),
                                           ("clamp", False, False), ("snake", False, False), ("gelu", True, True),
                                           ("gelu_then_res", True, True)])
def test_epilogue(dtype, shape, act, res, gamma):
    C = shape[-1]
    h = rand(*shape, dtype=dtype, device=DEVICE, scale=2.0)
    b = rand(C, dtype=dtype, device=DEVICE)
    r = rand(*shape, dtype=dtype, device=DEVICE) if res else None
    gm = rand(C, dtype=dtype, device=DEVICE) if gamma else None
    alpha = (torch.rand(C) * 2 + 0.2).to(DEVICE, dtype)
    out = epilogue(h, b, act, res=r, gamma=gm, alpha=alpha, lo=-0.5, hi=0.7)
    want = epilogue_ref(*f64(h, b), act, res=f64(r)[0], gamma=f64(gm)[0], alpha=f64(alpha)[0], lo=-0.5, hi=0.7)
    assert_close(f"{act} res={res} gamma={gamma}", out, want, dtype)
    if act == "gelu_then_res":  # the residual after the activation, not inside it
        direct = f64(r)[0] + torch.nn.functional.gelu(f64(gm)[0] * (f64(h)[0] + f64(b)[0]))
        assert_close("res + gelu", out, direct, dtype)


def test_in_place_and_no_bias():
    h = rand(2, 37, 96, device=DEVICE)
    want = epilogue_ref(h.double(), None, "gelu")
    out = epilogue(h, None, "gelu", out=h)
    assert out.data_ptr() == h.data_ptr()
    assert_close("in place gelu", out, want)


def test_snake_large_arguments():
    """sin of |alpha x| ~ 100: accurate range reduction needed (no fast approximations)."""
    h = rand(4, 64, device=DEVICE, scale=30.0)
    alpha = torch.full((64,), 3.0, device=DEVICE)
    assert_close("snake", epilogue(h, None, "snake", alpha=alpha), epilogue_ref(h.double(), None, "snake", alpha=alpha.double()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sizes(dtype):
    for shape in [(4096, 4, 1024), (8, 2048, 4096), (8, 500, 480)]:
        h = rand(*shape, dtype=dtype, device="cuda")
        b = rand(shape[-1], dtype=dtype, device="cuda")
        assert_close("gelu", epilogue(h, b, "gelu"), epilogue_ref(*f64(h, b), "gelu"), dtype)
