"""Comparison helpers that say how many elements mismatch and where."""
import numpy as np
import torch


def to_np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


# The float32 model against the upstream's golden outputs on CPU: the reference ops are within
# 1.5e-6 of max|ref| (measured on feats, lats, qfeats and audio, offline and streaming), and the
# kernels under the interpreter pass at 1e-5 too. assert_close's default 1e-4 let a 1 % error in
# every focal layer's context through (it moves lats, qfeats and audio by 3e-5 to 5e-5 of
# max|ref|): golden checks that run on CPU use this instead.
GOLDEN_REL = 1e-5


def assert_close(name, got, ref, rel=1e-4, atol=0.0):
    """|got - ref| <= rel * max|ref| + atol elementwise; a NaN in got is always off."""
    got, ref = to_np(got).astype(np.float64), to_np(ref).astype(np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(ref).all(), f"{name}: the reference has {int((~np.isfinite(ref)).sum())} non-finite values"
    tol = rel * np.abs(ref).max(initial=0.0) + atol
    err = np.abs(got - ref)
    bad = ~(err <= tol)  # NaN in got is off, not silently within any tolerance
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.size} elements off by more than {tol:.3g}; "
            f"max err {err.max():.3g}; first at {first}: got {got[first]:.6g} ref {ref[first]:.6g}"
        )


def assert_tokens(name, got, ref, lats=None, margin=1e-5):
    """Tokens equal; where lats is given, only bits with |lat| > margin must agree."""
    got, ref = to_np(got).astype(np.int64), to_np(ref).astype(np.int64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    diff = got != ref
    if lats is not None and diff.any():
        lats = to_np(lats)
        D = lats.shape[-1]
        bits_diff = ((got ^ ref)[..., None] >> np.arange(D - 1, -1, -1)) & 1
        ambiguous = np.abs(lats) <= margin
        diff = (bits_diff.astype(bool) & ~ambiguous).any(-1)
    if diff.any():
        first = tuple(int(i) for i in np.argwhere(diff)[0])
        raise AssertionError(f"{name}: {int(diff.sum())}/{diff.size} tokens differ; first at {first}: {got[first]} vs {ref[first]}")


def device_tiles(monkeypatch) -> list:
    """Make the kernels launch with the tiles a GPU launch picks (the interpreter's own choice is
    whole tiles in few programs). Returns the list of the matmul kernel's tiles, one a launch."""
    import fastfocal.kernels._common as common
    import fastfocal.kernels.linear as lin

    monkeypatch.setattr(common, "INTERP_TILES", False)
    real, picked = lin.tile, []
    monkeypatch.setattr(lin, "tile", lambda *a, **kw: picked.append(real(*a, **kw)) or picked[-1])
    return picked
