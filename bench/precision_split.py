"""Split-precision matmuls: do float32 activations with tensor-core dots keep the tokens?

Triton's `tl.dot(..., input_precision=)` runs a float32 product on tensor cores as a sum of
16-bit (or TF32) parts: "tf32" (one TF32 product, 11 significant bits per operand), "bf16x3"
(a = a_hi + a_lo in bf16, three products: ~16 bits), "tf32x3" (three TF32 products: ~22 bits),
"bf16x6" (three bf16 parts, six products: ~24 bits); "bf16x3-coarse" here only: bf16x3 with
its low part a bit short, twice the operand error (a bound on what the emulation leaves out). Activations, norms, residuals and the
quantizer stay float32. On CPU this bench emulates that by rounding every matmul operand of the
encoder and the compressor (linears, feature-extractor and positional convs, attention's q/k/v,
the focal levels' input and taps, the modulation) to what its parts represent, then computing in
float32; the dropped low x low products are not emulated (their size is that of the operand
rounding: `--check` measures how far the emulation is from the real three-product sum on one
matmul). Token agreement with float32 on real speech, and the latent error.

Appends rows (bench "precision_split") to bench/results/precision.jsonl.

    python bench/precision_split.py --random-init 50hz_4k_causal --files 34 --seconds 20
    python bench/precision_split.py --model tests/data/tiny_causal --files 34 --seconds 20
    python bench/precision_split.py --random-init 50hz_4k_causal --files 34 --seconds 20 --shifts 4 --modes bf16x3 bf16x3-coarse
    python bench/precision_split.py --check
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
# op -> positions of its matmul operands (a list argument: every tensor in it)
OPERANDS = {
    "linear": (0, 1), "linear_gelu": (0, 1), "linear_residual": (0, 1), "linear_residual_layer_norm": (0, 1),
    "linear_residual_dyt": (0, 1), "causal_conv_ln_gelu": (0, 1), "conv_time_major": (0, 1),
    "grouped_conv_gelu_time_major": (0, 1), "grouped_conv1d": (0, 1), "rel_attention": (0,),
    "focal_context": (0, 2), "modulate": (1, 2),
}


def keep_bits(x: Tensor, stored: int) -> Tensor:
    """Round float32 to `stored` mantissa bits, nearest with ties away (as cvt.rna.tf32.f32 at 10)."""
    drop = 23 - stored
    b = x.contiguous().view(torch.int32)
    return ((b + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


def tf32(x: Tensor) -> Tensor:
    return keep_bits(x, 10)


def bf16(x: Tensor) -> Tensor:
    return x.bfloat16().float()


def parts(x: Tensor, mode: str) -> list[Tensor]:
    """x as the parts a split dot multiplies: their sum is what the tensor cores see of x."""
    if mode == "tf32":
        return [tf32(x)]
    if mode == "bf16x3-coarse":  # the low part one bit short: twice the operand error, a bound
        hi = bf16(x)               # on what the emulation leaves out (the dropped low x low products)
        return [hi, keep_bits(x - hi, 6)]
    one = tf32 if mode == "tf32x3" else bf16
    n = 3 if mode == "bf16x6" else 2
    out = []
    for _ in range(n):
        out.append(one(x))
        x = x - out[-1]
    return out


def emulate(x: Tensor, mode: str) -> Tensor:
    return torch.stack(parts(x, mode)).sum(0) if mode != "tf32" else tf32(x)


def split_matmul(a: Tensor, b: Tensor, mode: str) -> Tensor:
    """The product the split dot computes, in float32 (the products of the parts are exact
    there; what remains is float32 accumulation): all pairs of parts whose order is kept."""
    pa, pb = parts(a, mode), parts(b, mode)
    keep = {"tf32": 1, "tf32x3": 2, "bf16x3": 2, "bf16x3-coarse": 2, "bf16x6": 3}[mode]  # pairs i + j < keep
    return sum(pa[i] @ pb[j] for i in range(len(pa)) for j in range(len(pb)) if i + j < keep)


def check() -> None:
    """Relative error against float64 of the real split product and of this bench's emulation."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 1024, generator=g), torch.randn(1024, 512, generator=g) / 32
    exact = a.double() @ b.double()
    rel = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
    print(f"{'mode':8} {'split product':>14} {'emulation':>10}   (float32: {rel(a @ b):.2e})")
    for m in ("tf32", "bf16x3", "bf16x3-coarse", "tf32x3", "bf16x6"):
        print(f"{m:8} {rel(split_matmul(a, b, m)):14.2e} {rel(emulate(a, m) @ emulate(b, m)):10.2e}")


class Split:
    """Wraps the matmul ops: while `mode` is set, their operands are rounded as the split dot sees them."""

    def __init__(self):
        self.mode = None
        for name, pos in OPERANDS.items():
            setattr(ops, name, self._wrap(getattr(ops, name), pos))

    def _wrap(self, fn, pos):
        def r(v):
            if isinstance(v, (list, tuple)):
                return type(v)(r(t) for t in v)
            return emulate(v, self.mode) if isinstance(v, Tensor) and v.dtype == torch.float32 else v

        def f(*a, **k):
            if self.mode is None:
                return fn(*a, **k)
            return fn(*[r(v) if i in pos else v for i, v in enumerate(a)], **k)
        return f


def main() -> None:
    ap = parser(__doc__, 34)
    ap.add_argument("--modes", nargs="+", default=["tf32", "bf16x3", "tf32x3", "bf16x6"])
    ap.add_argument("--check", action="store_true", help="only compare the emulation with the real split product")
    ap.add_argument("--shifts", type=int, default=1, help="each file also started 1/N, 2/N ... of a token later: "
                    "other frame alignments, other latents (N times the tokens)")
    args = ap.parse_args()
    if args.check:
        return check()
    codec = fastfocal.open_codec(args.model, args.random_init, "cpu", "fp32")
    hop = codec.sample_rate_input // int(codec.token_rate)
    xs = [x[round(k * hop / args.shifts):] for x in speech(args.audio, args.files, args.seconds) for k in range(args.shifts)]
    want = [codec.sig_to_toks(x) for x in xs]
    lat32 = torch.cat([codec.sig_to_lats(x).reshape(-1, codec.code_dim) for x in xs]).double()
    split = Split()
    n = sum(w.numel() for w in want)
    info = {**machine(), "bench": "precision_split", "model": codec.name, "files": len(xs) // args.shifts,
            "shifts": args.shifts, "seconds_per_file": args.seconds, "tokens": n}
    RESULTS.mkdir(exist_ok=True)
    margin = lat32.abs().min(1).values
    print(f"{codec.name}: {len(xs) // args.shifts} files x <= {args.seconds:g} s x {args.shifts} shifts, {n} tokens; latent rms "
          f"{float(lat32.pow(2).mean().sqrt()):.3f}, tokens with a component within 1e-5 / 1e-4 of zero: "
          f"{100 * float((margin < 1e-5).double().mean()):.2f} / {100 * float((margin < 1e-4).double().mean()):.2f} %")
    print(f"{'split dots (E + C)':20} {'flips':>6} {'agreement':>10} {'latent err p50':>15} {'p99':>9}")
    for mode in args.modes:
        t0 = time.time()
        split.mode = mode
        try:
            toks = [codec.sig_to_toks(x) for x in xs]
            lats = torch.cat([codec.sig_to_lats(x).reshape(-1, codec.code_dim) for x in xs]).double()
        finally:
            split.mode = None
        bad = sum(int((t != w).sum()) for t, w in zip(toks, want))
        err = (lats - lat32).abs().flatten()
        q50, q99 = (float(err.quantile(p)) for p in (0.5, 0.99))
        row = {"mode": mode, "flips": bad, "token_agreement": round(1 - bad / n, 5), "latent_err_q500": q50,
               "latent_err_q990": q99}
        with open(RESULTS / "precision.jsonl", "a") as f:
            f.write(json.dumps({**info, **row}) + "\n")
        print(f"{mode:20} {bad:6d} {100 * (1 - bad / n):9.2f}% {q50:15.2e} {q99:9.2e}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
