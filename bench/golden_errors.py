"""Max errors vs the upstream golden vectors (tests/data/tiny_*), offline and streaming, fp32 CPU.

    python bench/golden_errors.py
"""
from pathlib import Path

import numpy as np
import torch

import fastfocal

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
T = torch.from_numpy


def err(g, name, got) -> str:
    ref = g[name]
    e = np.abs(got.numpy() - ref).max()
    return f"{name} {e:.2e} ({e / np.abs(ref).max():.1e} rel)"


for model in ("tiny_causal", "tiny_noncausal"):
    c = fastfocal.load(DATA / model, device="cpu")
    g = np.load(DATA / model / "golden.npz")
    sig = T(g["sig"])
    out = [
        err(g, "feats", c.sig_to_feats(sig)),
        err(g, "lats", c.sig_to_lats(sig)),
        err(g, "qfeats", c.codes_to_qfeats(T(g["codes"]))),
        err(g, "rec_sig", c.sig_to_sig(sig)),
        err(g, "dec_rec_sig", c.decode(T(g["dec_toks"]))),
        f"toks exact {bool((c.sig_to_toks(sig).numpy() == g['toks']).all())}",
    ]
    if "stream_toks" in g:
        s = c.stream(2)
        steps = [s.push(sig[:, a:a + 1280]) for a in range(0, sig.shape[1], 1280)] + [s.flush()]
        out.append(f"stream_toks exact {bool((torch.cat([t for t, _ in steps], 1).numpy() == g['stream_toks']).all())}")
        out.append(err(g, "stream_rec_sig", torch.cat([a for _, a in steps], 1)))
        d = c.stream_decoder(2)
        toks = T(g["dec_toks"])
        dec = [d.push(toks[:, a:a + 4]) for a in range(0, toks.shape[1], 4)] + [d.flush()]
        out.append(err(g, "stream_dec_rec_sig", torch.cat(dec, 1)))
    print(f"{model}: " + "; ".join(out))
