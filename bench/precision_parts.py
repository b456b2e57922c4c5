"""Which part of the encoder decides the tokens' signs in fp16, and how close they sit to zero.

The model runs in float32; one part of the encoder at a time has its matmul operands and
outputs rounded to float16 (what an fp16 kernel with fp32 accumulation stores), so each part's
share of the token flips is measured alone. `--rounding` also rounds only the weights or only
the activations everywhere. Then the margin: how many tokens have a latent component nearer
to zero than the fp16-rounded run's latent error, i.e. tokens no 16-bit encoder can decide.

Appends rows (bench "precision_parts") to bench/results/precision.jsonl.

    python bench/precision_parts.py --random-init 50hz_4k_causal --files 34 --seconds 20
    python bench/precision_parts.py --model tests/data/tiny_causal --files 34 --seconds 20
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
import fastfocal  # noqa: E402
from fastfocal import ops  # noqa: E402
from precision import parser, speech  # noqa: E402
from stream_latency import machine  # noqa: E402

RESULTS = Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or Path(__file__).parent / "results")  # tests point it at a tmp dir
# op name -> position of its weight argument; every encoder matmul and norm goes through these
WRAPPED = ("linear", "linear_gelu", "linear_residual_layer_norm", "linear_residual", "layer_norm_gelu", "layer_norm",
           "grouped_conv_gelu_time_major")


def parts_of(enc) -> dict[int, str]:
    """data_ptr of each encoder weight -> the part it belongs to."""
    part = {}
    for i, l in enumerate(enc.feature_extractor.layers):
        part[l.conv.weight.data_ptr()] = part[l.norm.weight.data_ptr()] = f"fe{i}"
    part[enc.norm.weight.data_ptr()] = part[enc.feature_proj.weight.data_ptr()] = "proj"
    part[enc.encoder.positional_embedding.conv.weight.data_ptr()] = "pos"
    for i, l in enumerate(enc.encoder.layers):
        for w in (l.attention.qkv_proj.weight, l.attention.out_proj.weight, l.attention_norm.weight):
            part[w.data_ptr()] = f"L{i}.attn"
        for w in (l.feed_forward.in_proj.weight, l.feed_forward.out_proj.weight, l.feed_forward_norm.weight):
            part[w.data_ptr()] = f"L{i}.ffn"
    return part


def groups(n_fe: int, n_layers: int) -> dict[str, set[str]]:
    L = [f"L{i}.{k}" for i in range(n_layers) for k in ("attn", "ffn")]
    return {
        "encoder": {f"fe{i}" for i in range(n_fe)} | {"proj", "pos"} | set(L),
        "feature extractor": {f"fe{i}" for i in range(n_fe)},
        "fe conv 0": {"fe0"}, "fe conv 1": {"fe1"}, "fe convs 2+": {f"fe{i}" for i in range(2, n_fe)},
        "feature proj": {"proj"}, "pos conv": {"pos"},
        "attention (all layers)": {x for x in L if x.endswith("attn")},
        "ffn (all layers)": {x for x in L if x.endswith("ffn")},
        "first half of layers": set(L[: len(L) // 2]), "second half of layers": set(L[len(L) // 2:]),
    }


class Rounding:
    """Wraps the encoder's ops: calls whose weight is in `active` get fp16-rounded operands."""

    def __init__(self, part: dict[int, str]):
        self.part, self.active, self.what = part, set(), "all"
        for name in WRAPPED:
            setattr(ops, name, self._wrap(getattr(ops, name)))

    def _wrap(self, fn):
        def f(*a, **k):
            if self.part.get(a[1].data_ptr()) not in self.active:
                return fn(*a, **k)
            r16 = lambda t: t.half().float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            rnd_x, rnd_w = self.what in ("all", "activations"), self.what in ("all", "weights")
            args = [r16(v) if (i == 0 and rnd_x) or (i == 1 and rnd_w) else v for i, v in enumerate(a)]
            out = fn(*args, **k)
            if self.what != "all":
                return out
            return tuple(r16(v) for v in out) if isinstance(out, tuple) else r16(out)
        return f


def main() -> None:
    args = parser(__doc__, 34).parse_args()
    codec = fastfocal.open_codec(args.model, args.random_init, "cpu", "fp32")
    xs = speech(args.audio, args.files, args.seconds)
    want = [codec.sig_to_toks(x) for x in xs]
    lat32 = [codec.sig_to_lats(x) for x in xs]
    enc = codec.model.encoder
    rnd = Rounding(parts_of(enc))
    info = {**machine(), "bench": "precision_parts", "model": codec.name, "files": len(xs),
            "seconds_per_file": args.seconds, "tokens": sum(w.numel() for w in want)}
    RESULTS.mkdir(exist_ok=True)

    def flips(active: set[str], what: str, keep_lats: bool) -> tuple[int, list[Tensor] | None]:
        rnd.active, rnd.what = active, what
        toks = [codec.sig_to_toks(x) for x in xs]
        lats = [codec.sig_to_lats(x) for x in xs] if keep_lats else None
        rnd.active = set()
        return sum(int((t != w).sum()) for t, w in zip(toks, want)), lats

    def emit(row: dict) -> None:
        with open(RESULTS / "precision.jsonl", "a") as f:
            f.write(json.dumps({**info, **row}) + "\n")

    n = info["tokens"]
    G = groups(len(enc.feature_extractor.layers), len(enc.encoder.layers))
    print(f"{codec.name}: {len(xs)} files x <= {args.seconds:g} s, {n} tokens")
    print(f"{'fp16-rounded part (rest fp32)':34} {'rounded':>11} {'flips':>6} {'agreement':>9}")
    lat16 = None
    runs = [("encoder", "weights"), ("encoder", "activations")] + [(g, "all") for g in G]
    for g, what in runs:
        t0 = time.time()
        bad, lats = flips(G[g], what, keep_lats=(g, what) == ("encoder", "all"))
        lat16 = lats if lats is not None else lat16
        emit({"part": g, "rounded": what, "flips": bad, "token_agreement": round(1 - bad / n, 5)})
        print(f"{g:34} {what:>11} {bad:6d} {100 * (1 - bad / n):8.2f}%  ({time.time() - t0:.0f} s)", flush=True)

    # margins: a token flips when a latent component is nearer to zero than the error there
    L = torch.cat([x.reshape(-1, x.shape[-1]) for x in lat32]).double()
    E = (torch.cat([x.reshape(-1, x.shape[-1]) for x in lat16]).double() - L).abs()
    margin = L.abs().min(1).values
    q = {f"err_q{int(p * 1000)}": float(E.flatten().quantile(p)) for p in (0.5, 0.9, 0.99)}
    below = {f"tokens_margin_below_{t:g}": round(float((margin < t).double().mean()), 5) for t in (1e-4, 3e-4, 1e-3)}
    emit({"part": "margins", "latent_rms": float(L.pow(2).mean().sqrt()), **q, **below,
          "tokens_margin_below_own_error": round(float((L.abs() < E).any(1).double().mean()), 5)})
    print(f"latent rms {float(L.pow(2).mean().sqrt()):.4f}; fp16-encoder latent error " +
          ", ".join(f"{k[4:]} {v:.2e}" for k, v in q.items()))
    print("tokens with a component nearer zero than " + ", ".join(f"{k.rsplit('_', 1)[1]}: {100 * v:.2f}%" for k, v in below.items()))


if __name__ == "__main__":
    main()
