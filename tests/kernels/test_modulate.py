"""Modulate kernel: q * (m + bias) with q a strided view of in_proj's output."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, assert_close, f64, rand

from fastfocal.kernels.modulate import modulate, modulate_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C", [(1, 1, 12), (2, 4, 96), (2, 37, 12), (1, 37, 1024), (3, 5, 145)])
def test_modulate(dtype, B, T, C):
    h = rand(B, T, 2 * C + 3, dtype=dtype, device=DEVICE)
    q = h[..., :C]
    acc = rand(B, T, C, dtype=dtype, device=DEVICE)
    w = rand(C, C, dtype=dtype, device=DEVICE, scale=C ** -0.5)
    b = rand(C, dtype=dtype, device=DEVICE)
    m = torch.nn.functional.linear(acc, w)
    got = modulate(q, m, b)
    assert_close("modulate", got, modulate_ref(*f64(q, acc, w, b)), dtype)
    # in place on m, as ops.modulate does
    assert modulate(q, m, b, out=m).data_ptr() == m.data_ptr()
    assert_close("modulate in place", m, got, dtype, rel=0.0)


def test_non_evenly_strided_q():
    base = rand(2, 6, 40, device=DEVICE)
    q = base[:, ::2, :12]  # rows are evenly spaced here...
    q = torch.cat([q, q], 0).transpose(0, 1)  # ...and not here: copied, still right
    m, b = rand(*q.shape, device=DEVICE), rand(12, device=DEVICE)
    assert_close("modulate", modulate(q, m.contiguous(), b), q.double() * (m.double() + b.double()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sizes(dtype):
    for B, T, C in [(4096, 4, 1024), (8, 2048, 1024)]:
        h = rand(B, T, 2 * C + 3, dtype=dtype, device="cuda")
        m, b = rand(B, T, C, dtype=dtype, device="cuda"), rand(C, dtype=dtype, device="cuda")
        assert_close("modulate", modulate(h[..., :C], m, b), h[..., :C].double() * (m.double() + b.double()), dtype)
