"""Where reduced precision flips token signs: token agreement with float32 on real speech for
precision variants of the encoder (WavLM) and the compressor (whose output signs are the tokens).

Variants (E = encoder, C = compressor):
  bf16 / fp16                  everything in that dtype
  {bf16,fp16} E + fp32 C       the sign-deciding stage kept in float32
  fp32 E + {bf16,fp16} C       the encoder kept in float32
  autocast-fp16 E + fp32 C     the encoder's matmuls/convs in fp16 (fp32 accumulate), every
                               activation, norm and residual in float32 (torch.autocast)
  fp32, <mode> dots            (--f32-dots, CUDA) the float32 codec with split tensor-core dots

fp16 runs on CPU here only for the measurement (slow there; fastfocal refuses it on CPU).
Appends rows to bench/results/precision.jsonl.

    python bench/precision.py --model tests/data/tiny_causal --files 12 --seconds 20
    python bench/precision.py --random-init 50hz_4k_causal --files 6 --seconds 8
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fastfocal  # noqa: E402
from fastfocal.audio import read_audio  # noqa: E402
from fastfocal.codec import Codec  # noqa: E402
from stream_latency import machine  # noqa: E402

RESULTS = Path(os.environ.get("FASTFOCAL_BENCH_RESULTS") or Path(__file__).parent / "results")  # tests point it at a tmp dir


def parser(doc: str, files: int) -> argparse.ArgumentParser:
    """The model / speech arguments of the precision benches."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-init", default=None)
    ap.add_argument("--audio", default=str(Path(__file__).parent.parent.parent / "shared" / "audio"))
    ap.add_argument("--files", type=int, default=files)
    ap.add_argument("--seconds", type=float, default=20)
    return ap


def speech(audio: str, files: int, seconds: float) -> list[torch.Tensor]:
    """The first `files` wav/flac files under `audio` (sorted), cut to `seconds`."""
    paths = sorted(glob.glob(f"{audio}/**/*.wav", recursive=True) + glob.glob(f"{audio}/**/*.flac", recursive=True))
    return [torch.from_numpy(read_audio(f))[: int(16000 * seconds)] for f in paths[:files]]


def main() -> None:
    ap = parser(__doc__, 12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--f32-dots", nargs="*", default=[], choices=[m for m in fastfocal.F32_DOTS if m != "ieee"],
                    help="also the float32 codec with these split tensor-core dots (CUDA only; on CPU "
                         "bench/precision_split.py emulates them)")
    args = ap.parse_args()
    if args.f32_dots and not args.device.startswith("cuda"):
        ap.error("--f32-dots needs --device cuda: CPU dots are float32 whatever the mode")
    fastfocal.set_f32_dot("ieee")  # the reference is exact float32 whatever FASTFOCAL_F32_DOT says
    ref = fastfocal.open_codec(args.model, args.random_init, args.device, "fp32")
    xs = speech(args.audio, args.files, args.seconds)
    want = [ref.sig_to_toks(x) for x in xs]
    feats32 = [ref.sig_to_feats(x) for x in xs]
    low = {dt: Codec(copy.deepcopy(ref.model).to(dt), str(dt)) for dt in (torch.bfloat16, torch.float16)}

    def variants(i):
        x = xs[i]
        for dt, c in low.items():
            n = str(dt).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp")
            f = c.sig_to_feats(x)
            yield n, c.feats_to_toks(f)
            yield f"{n} E + fp32 C", ref.feats_to_toks(f.float())
            yield f"fp32 E + {n} C", c.feats_to_toks(feats32[i].to(dt))
        # the reference ops under autocast (the Triton epilogues would keep fp16 activations)
        old = os.environ.get("FASTFOCAL_BACKEND")
        os.environ["FASTFOCAL_BACKEND"] = "torch"
        try:
            with torch.autocast(ref.device.type, dtype=torch.float16):
                f = ref.sig_to_feats(x)
        finally:
            os.environ.pop("FASTFOCAL_BACKEND") if old is None else os.environ.update(FASTFOCAL_BACKEND=old)
        yield "autocast-fp16 E + fp32 C", ref.feats_to_toks(f.float())
        for m in args.f32_dots:  # float32 activations, matmuls as split tensor-core products
            fastfocal.set_f32_dot(m)
            try:
                yield f"fp32, {m} dots", ref.sig_to_toks(x)
            finally:
                fastfocal.set_f32_dot("ieee")

    agree: dict[str, list[int]] = {}
    t0 = time.time()
    for i in range(len(xs)):
        for name, toks in variants(i):
            a = agree.setdefault(name, [0, 0, 0, 0])
            a[0] += int((toks == want[i]).sum())
            a[1] += want[i].numel()
            bits = (toks ^ want[i]).flatten()
            a[2] += sum(bin(int(v)).count("1") for v in bits[bits != 0])
            a[3] += want[i].numel() * ref.code_dim
    RESULTS.mkdir(exist_ok=True)
    info = machine()
    print(f"{ref.name}: {len(xs)} files x <= {args.seconds:g} s, {time.time() - t0:.0f} s")
    print(f"{'variant':28} {'tokens':>8} {'bits':>8}")
    for name, (ok, n, bad_bits, nb) in agree.items():
        row = {**info, "bench": "precision", "model": ref.name, "files": len(xs), "seconds_per_file": args.seconds,
               "variant": name, "token_agreement": round(ok / n, 5), "bit_agreement": round(1 - bad_bits / nb, 6)}
        with open(RESULTS / "precision.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name:28} {100 * ok / n:7.2f}% {100 * (1 - bad_bits / nb):7.3f}%")


if __name__ == "__main__":
    main()
