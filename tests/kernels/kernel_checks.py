"""Comparisons for kernel tests: say how many elements are off, where, and by how much."""
import numpy as np
import torch

# |got - ref| <= TOL * max|ref| (+ atol). bf16 keeps 8 bits: a few ulps of the largest value;
# a wrong kernel (bad index, missing term, wrong tap) is off by O(max|ref|).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _np(x):
    return x.detach().to(torch.float64).cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def assert_close(name, got, ref, dtype=torch.float32, rel=None, atol=0.0):
    g, r = _np(got), _np(ref)
    assert g.shape == r.shape, f"{name}: shape {g.shape} != {r.shape}"
    assert np.isfinite(g).all(), f"{name}: {int((~np.isfinite(g)).sum())} non-finite values, first at {tuple(np.argwhere(~np.isfinite(g))[0])}"
    assert np.isfinite(r).all(), f"{name}: the reference has {int((~np.isfinite(r)).sum())} non-finite values"
    tol = (TOL[dtype] if rel is None else rel) * max(np.abs(r).max(initial=0.0), 1e-30) + atol
    err = np.abs(g - r)
    bad = ~(err <= tol)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        worst = tuple(int(i) for i in np.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.size} elements off by more than {tol:.3g} "
            f"(max err {err.max():.3g} at {worst}); first at {first}: got {g[first]:.6g} ref {r[first]:.6g}"
        )


def assert_equal(name, got, ref):
    """Bit-exact (state that is a pure copy; tokens; untouched slots)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, f"{name}: {tuple(got.shape)} {got.dtype} vs {tuple(ref.shape)} {ref.dtype}"
    a, b = got.detach().cpu(), ref.detach().cpu()
    if a.is_floating_point():
        a, b = a.view(torch.int16 if a.element_size() == 2 else torch.int32 if a.element_size() == 4 else torch.int64), \
            b.view(torch.int16 if b.element_size() == 2 else torch.int32 if b.element_size() == 4 else torch.int64)
    bad = (a != b).numpy()
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.size} elements differ; first at {first}: "
                             f"got {got.detach().cpu()[first].item()} ref {ref.detach().cpu()[first].item()}")


def f64(*ts):
    return [None if t is None else t.detach().to(torch.float64) if t.is_floating_point() else t for t in ts]


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
