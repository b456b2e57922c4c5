"""ConvNeXt front kernel: depthwise 7-tap conv + LayerNorm, causal with a zero-initialised
cache (rows by slot index, shifted in place) or 'same' padding."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, assert_close, assert_equal, f64, rand

from fastfocal.kernels.convnext import dwconv_layer_norm, dwconv_layer_norm_ref


def params(C, dtype):
    return [rand(C, 1, 7, dtype=dtype, device=DEVICE, scale=0.4), rand(C, dtype=dtype, device=DEVICE),
            rand(C, dtype=dtype, device=DEVICE) + 1, rand(C, dtype=dtype, device=DEVICE)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C", [(2, 1, 12), (3, 4, 96), (2, 37, 12), (1, 4, 1024), (2, 9, 145)])
def test_stream_steps(dtype, B, T, C):
    S = B + 2
    p = params(C, dtype)
    cache = torch.zeros(S, C, 6, device=DEVICE, dtype=dtype)
    cache[-1] = 1.5  # a row nobody steps
    idx = torch.randperm(S - 1)[:B].to(DEVICE)
    untouched = [i for i in range(S) if i not in idx.tolist()]
    before = cache[untouched].clone()
    for step in range(3):
        x = rand(B, T, C, dtype=dtype, device=DEVICE, scale=2.0)
        ref = cache.clone()
        want = dwconv_layer_norm_ref(*f64(x, *p), 1e-6, True, ref.double(), idx)
        got = dwconv_layer_norm(x, *p, 1e-6, True, cache, idx)
        assert_close(f"step {step}", got, want, dtype)
        dwconv_layer_norm_ref(x, *p, 1e-6, True, ref, idx)
        assert_equal(f"cache step {step}", cache, ref)  # frames of x: a pure copy
    assert_equal("untouched slots", cache[untouched], before)


@pytest.mark.parametrize("T", [1, 3, 5, 6, 7, 9])
def test_stream_steps_over_several_time_tiles(T, monkeypatch):
    """A call split into time tiles leaves the cache write to the launcher, for any T: also
    fewer frames than the cache holds (then the new cache is the old one's tail and x). The
    device's 4096-element tile does this at 1024 channels for 5 frames; a small tile here."""
    from fastfocal.kernels import convnext

    monkeypatch.setattr(convnext, "TILE", 64)  # 32 channels: 2 frames a tile
    C, S, dtype = 32, 4, torch.float32
    p = params(C, dtype)
    cache = rand(S, C, 6, dtype=dtype, device=DEVICE)
    idx = torch.tensor([2, 0], device=DEVICE)
    ref = cache.clone()
    for step in range(3):
        x = rand(2, T, C, dtype=dtype, device=DEVICE, scale=2.0)
        want = dwconv_layer_norm_ref(*f64(x, *p), 1e-6, True, ref.double(), idx)
        got = dwconv_layer_norm(x, *p, 1e-6, True, cache, idx)
        assert_close(f"T={T} step {step}", got, want, dtype)
        dwconv_layer_norm_ref(x, *p, 1e-6, True, ref, idx)
        assert_equal(f"cache T={T} step {step}", cache, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,T,C", [(2, 1, 12), (2, 4, 96), (2, 37, 12), (1, 70, 1024)])
def test_offline(dtype, causal, B, T, C):
    p = params(C, dtype)
    x = rand(B, T, C, dtype=dtype, device=DEVICE, scale=2.0)
    assert_close("dwconv+ln", dwconv_layer_norm(x, *p, 1e-6, causal), dwconv_layer_norm_ref(*f64(x, *p), 1e-6, causal), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sizes(dtype):
    p = [t.to("cuda") for t in params(1024, dtype)]
    cache = torch.randn(300, 1024, 6, device="cuda", dtype=dtype)
    idx = torch.randperm(300, device="cuda")[:256]
    x = rand(256, 4, 1024, dtype=dtype, device="cuda")
    want = dwconv_layer_norm_ref(*f64(x, *p), 1e-6, True, cache.double(), idx)
    assert_close("stream", dwconv_layer_norm(x, *p, 1e-6, True, cache, idx), want, dtype)
    x = rand(8, 2048, 1024, dtype=dtype, device="cuda")
    assert_close("offline", dwconv_layer_norm(x, *p, 1e-6, True), dwconv_layer_norm_ref(*f64(x, *p), 1e-6, True), dtype)
