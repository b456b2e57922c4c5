"""The two numbers of a streaming step, counted (not timed): FLOPs and the fewest bytes it must
move, per stream and for N streams, and the floors they give on a device.

FLOPs: `torch.utils.flop_counter` over one batch-1 streaming step of the full-size model
(random weights, the plain reference ops, CPU; matmuls and convolutions, which are all but a
rounding of the work). Bytes: each state tensor's frames the step must read (a focal ring's
K-1 window frames, not its slack slots; the whole K/V rings, which attention reads in full)
plus the new frames it must write, the chunk in and the outputs out, and the weights once per
step (shared by every stream). Ceilings default to the H200 numbers of the issues; pass
measured ones.

    python bench/roofline.py [--mode full] [--dtype bf16] [--bandwidth 4.3e12] [--flops 7.9e14]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
os.environ.setdefault("FASTFOCAL_BACKEND", "torch")
import fastfocal  # noqa: E402
from fastfocal.kernels.focal_context import ring_len  # noqa: E402
from fastfocal.pipeline import Pipeline, stages_for  # noqa: E402


def state_bytes(model, stages, dtype) -> dict[str, tuple[int, int, int]]:
    """Per state kind: (bytes held, bytes a step must read, bytes a step must write) per stream."""
    e = torch.finfo(dtype).bits // 8
    T = model.cfg.chunk_frames
    out: dict[str, list[int]] = {}

    def add(kind, held, read, write):
        h, r, w = out.setdefault(kind, [0, 0, 0])
        out[kind] = [h + held, r + read, w + write]

    for s in stages:
        st = getattr(model, s).init_state(1, "meta", dtype)
        if s == "encoder":
            for t in st.k_ring + st.v_ring:  # (1, H, R, d): read whole, T frames written
                H, R, d = t.shape[1:]
                add("attention K/V rings", t.numel() * e, t.numel() * e, H * T * d * e)
            t = st.pos_conv_cache  # (1, R, C) ring: the conv_pos - 1 frames before the step read
            add("positional-conv cache", t.numel() * e, (model.encoder.cfg.conv_pos - 1) * t.shape[2] * e, t.shape[2] * T * e)
            for t in st.fe_caches:  # short caches at each conv's own rate: counted whole
                add("feature-extractor caches", t.numel() * e, t.numel() * e, t.numel() * e)
        elif s in ("compressor", "decompressor"):
            for rings, layer in zip(st.caches, getattr(model, s).layers):
                for t, conv in zip(rings, layer.focal_block.modulation.layers):
                    C, k = t.shape[1], conv[0].kernel_size[0]
                    assert t.shape[2] == ring_len(k)
                    add("focal rings", t.numel() * e, C * (k - 1) * e, C * T * e)
        else:
            t = st.emb_cache  # time-major ring (1, R, C): the k - 1 frames before the step read
            add("decoder conv caches", t.numel() * e, (model.decoder.cfg.kernel_size - 1) * t.shape[2] * e, t.shape[2] * T * e)
            for t in st.caches:  # channel-major (1, C, k - 1)
                add("decoder conv caches", t.numel() * e, t.numel() * e, t.shape[1] * T * e)
    return {k: tuple(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="50hz_4k_causal")
    ap.add_argument("--mode", default="full", choices=["full", "encode", "decode"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s (a device-to-device copy)")
    ap.add_argument("--flops", type=float, default=7.9e14, help="FLOP/s of the matrix units in this dtype")
    ap.add_argument("--memory", type=float, default=139e9, help="device memory, bytes")
    ap.add_argument("--streams", type=int, nargs="*", default=[1, 256, 1024, 4096, 8192])
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    e = torch.finfo(dtype).bits // 8
    codec = fastfocal.random_init(args.preset, seed=0, device="cpu", dtype="float32")
    model = codec.model
    stages = stages_for(args.mode)
    pipe = Pipeline(model, args.mode, 1)
    T = codec.config.chunk_frames
    x = torch.randn(1, pipe.chunk) * 0.1 if pipe.takes_audio else torch.randint(0, 4096, (1, T))
    with torch.inference_mode():
        pipe.step(x, torch.arange(1))  # not the first chunk: fresh-row shortcuts stay out of the count
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            outs = pipe.step(x, torch.arange(1))
    flops = fc.get_total_flops()
    weights = sum(p.numel() for s in stages for p in getattr(model, s).parameters()) * e
    kinds = state_bytes(model, stages, dtype)
    # the chunk in (fp32 audio or int64 tokens), tokens and/or fp32 audio out
    io = x.numel() * x.element_size() + sum(o.numel() * o.element_size() for o in outs[:-1])
    held = sum(v[0] for v in kinds.values())
    per_stream = sum(v[1] + v[2] for v in kinds.values()) + io
    print(f"# Roofline of one streaming step ({args.preset}, mode {args.mode}, {args.dtype}; "
          f"{T} frames = {T * 20} ms per step)\n")
    print(f"`python bench/roofline.py --mode {args.mode} --dtype {args.dtype}` "
          f"(ceilings {args.bandwidth / 1e12:.1f} TB/s, {args.flops / 1e12:.0f} TFLOP/s)\n")
    print("| state | held per stream | must read per step | must write per step |")
    print("|---|---|---|---|")
    for k, (h, r, w) in kinds.items():
        print(f"| {k} | {h / 2**20:.2f} MiB | {r / 2**20:.2f} MiB | {w / 2**10:.1f} KiB |")
    print(f"| all state | {held / 2**20:.2f} MiB | {sum(v[1] for v in kinds.values()) / 2**20:.2f} MiB | "
          f"{sum(v[2] for v in kinds.values()) / 2**10:.1f} KiB |")
    print(f"\nPer stream per step: {flops / 1e9:.3f} GFLOP, {per_stream / 2**20:.2f} MiB moved "
          f"(state read + written, chunk in, outputs out); weights {weights / 1e6:.0f} MB per step, shared.\n")
    print("| streams | bytes | FLOPs | byte floor | FLOP floor | floor | bound |")
    print("|---|---|---|---|---|---|---|")
    for n in args.streams:
        b = n * per_stream + weights
        f = n * flops
        tb, tf = b / args.bandwidth * 1e3, f / args.flops * 1e3
        print(f"| {n} | {b / 1e9:.2f} GB | {f / 1e12:.2f} TFLOP | {tb:.3f} ms | {tf:.3f} ms | "
              f"{max(tb, tf):.3f} ms | {'bytes' if tb > tf else 'FLOPs'} |")
    cap = (80e-3 - weights / args.bandwidth) / max(per_stream / args.bandwidth, flops / args.flops)
    fit = (args.memory - weights) / held
    print(f"\nStreams one device can step in real time (80 ms per step) at the floor: {cap:,.0f}; "
          f"streams whose state fits in {args.memory / 1e9:.0f} GB: {fit:,.0f}; so at most {min(cap, fit):,.0f}.")


if __name__ == "__main__":
    main()
