"""Split float32 dots (`FASTFOCAL_F32_DOT`, `fastfocal.set_f32_dot`): the mode reaches every
float32 tensor-core launch, many-row float32 matmuls leave cuBLAS for the matmul kernel, and the
codec still gives the golden outputs.

The interpreter computes every dot in float32 whatever its precision argument, so on CPU this
checks the routing and the launches (what each kernel is asked for, and that the GEMM-tile forms
give the golden outputs); on a GPU the same tests run the split products themselves."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import fastfocal
from fastfocal.kernels import _common
from helpers import GOLDEN_REL, assert_close, assert_tokens

T = torch.from_numpy
# Golden checks: GOLDEN_REL where measured (CPU: reference ops and interpreted kernels); the compiled
# GPU kernels keep assert_close's 1e-4 until a GPU run measures them.
GOLDEN = GOLDEN_REL if DEVICE == "cpu" else 1e-4
DOT_KERNELS = [("linear", "_linear_kernel"), ("attention", "_attn_kernel"),
               ("focal_context", "_level_long_kernel"), ("focal_context", "_window_rows_kernel")]


@pytest.fixture
def f32_dot():
    yield _common.set_f32_dot
    _common.set_f32_dot(None)


def test_modes_and_bad_values(f32_dot, monkeypatch):
    monkeypatch.delenv("FASTFOCAL_F32_DOT", raising=False)
    assert _common.f32_dot() == "ieee" and not _common.split_f32(torch.float32)  # the default: exact
    with pytest.raises(ValueError, match="'bf16x4': expected one of ieee, bf16x3, tf32x3, bf16x6"):
        f32_dot("bf16x4")
    with pytest.raises(ValueError, match="float32 dot mode 3: expected"):
        f32_dot(3)
    monkeypatch.setenv("FASTFOCAL_F32_DOT", "tf32")  # one TF32 product: 11 bits, not offered
    with pytest.raises(ValueError, match=r"'tf32' \(FASTFOCAL_F32_DOT\)"):
        _common.f32_dot()
    monkeypatch.setenv("FASTFOCAL_F32_DOT", " TF32x3")  # case and spaces as a shell may leave them
    assert _common.f32_dot() == "tf32x3" and _common.split_f32(torch.float32)
    assert not _common.split_f32(torch.bfloat16)
    assert _common.dot_precision(torch.float32) == ("ieee" if _common.INTERPRET else "tf32x3")
    assert _common.dot_precision(torch.bfloat16) == ("ieee" if _common.INTERPRET else "tf32")  # 16-bit dots ignore it
    assert _common.device_dot_precision(torch.float32, exact=True) == "ieee"
    fastfocal.set_f32_dot("ieee")  # set_f32_dot wins over the environment until set_f32_dot(None)
    assert not _common.split_f32(torch.float32) and _common.dot_precision(torch.float32) == "ieee"
    f32_dot(None)
    assert _common.f32_dot() == "tf32x3"


@pytest.mark.parametrize("mode", ["bf16x3", "ieee"])
def test_the_mode_reaches_every_float32_dot(causal, golden_causal, triton_backend, f32_dot, monkeypatch, mode):
    """Offline encode + decode of the tiny causal model: each dot-bearing launch is asked for the
    mode, no float32 matmul of the encoder or compressor is left to cuBLAS in a split mode, and
    the outputs are the golden ones (on a GPU: computed with the split products)."""
    import importlib
    import inspect

    from fastfocal.kernels import linear as klin
    seen = []

    def spy(mod, name):
        real = getattr(mod, name)
        m_arg = list(inspect.signature(real.fn).parameters).index("M") if name == "_linear_kernel" else None

        class Spy:
            def __getitem__(self, grid):
                def launch(*a, **k):
                    few = m_arg is not None and a[m_arg] <= klin.FEW_ROWS
                    seen.append((name, k["PREC"], few))
                    if interpreted:  # the interpreter runs tf32/tf32x3/ieee only, all as float32
                        k["PREC"] = "ieee"
                    return real[grid](*a, **k)
                return launch
        monkeypatch.setattr(mod, name, Spy())

    interpreted = _common.INTERPRET
    for m, name in DOT_KERNELS:
        spy(importlib.import_module(f"fastfocal.kernels.{m}"), name)
    monkeypatch.setattr(_common, "dot_precision", _common.device_dot_precision)  # as compiled launches ask
    exact_mm, real_linear = [], F.linear

    def linear(x, w, b=None):
        if x.dtype == torch.float32 and x.numel() > 16 * x.shape[-1]:
            exact_mm.append(tuple(w.shape))
        return real_linear(x, w, b)
    monkeypatch.setattr(F, "linear", linear)
    f32_dot(mode)
    g = golden_causal
    lats = causal.sig_to_lats(T(g["sig"]).to(DEVICE))
    enc_mm = list(exact_mm)
    rec = causal.codes_to_sig(causal.lats_to_codes(lats))
    assert_close("lats", lats, g["lats"], rel=GOLDEN)
    assert_tokens("toks", causal.lats_to_toks(lats), g["toks"], lats=g["lats"])
    assert_close("rec_sig", rec[:, :g["rec_sig"].shape[1]], g["rec_sig"], rel=GOLDEN)
    kernels = {n for n, _, _ in seen}
    assert {"_attn_kernel", "_level_long_kernel"} <= kernels, kernels
    assert {p for _, p, few in seen if not few} == {mode}, sorted(set(seen))
    assert {p for _, p, few in seen if few} <= {"ieee"}, sorted(set(seen))  # weight-read-bound: stays exact
    if mode != "ieee":  # every many-row matmul on the kernel's GEMM tiles
        assert ("_linear_kernel", mode, False) in seen and not enc_mm, f"float32 matmuls left to cuBLAS in {mode} mode: {enc_mm}"
    else:  # exact: cuBLAS's SGEMM as before
        assert enc_mm
