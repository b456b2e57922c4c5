"""Before/after of a code change on CPU: batch-1 Stream / decoder push and a 10 s offline encode,
full-size random weights, 1 thread; prints one line per run. Run it under two trees,
interleaved, e.g. an old commit checked out in /tmp/old:

    git worktree add /tmp/old 25c28e1
    for d in float32 bfloat16; do PYTHONPATH=/tmp/old python bench/ab_step.py $d; python bench/ab_step.py $d; done
"""
import argparse
import statistics
import time
from pathlib import Path

import soundfile as sf
import torch

import fastfocal

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("dtype", choices=["float32", "bfloat16", "float16"])
ap.add_argument("--preset", default="50hz_4k_causal", help="preset or config.json (random weights)")
ap.add_argument("--pushes", type=int, default=60, help="chunks pushed; the first 10 are warm-up")
args = ap.parse_args()
if args.pushes <= 10:
    ap.error("--pushes must be more than the 10 warm-up pushes")
torch.set_num_threads(1)
dtype = args.dtype
n = args.pushes
c = fastfocal.random_init(args.preset, device="cpu", dtype=dtype)
x, _ = sf.read(str(Path(__file__).resolve().parent.parent / "tests/data/audio/p287_007.wav"), dtype="float32")
x = torch.from_numpy(x)
res = {}
for mode in ("full", "decode"):
    s = c.stream() if mode == "full" else c.stream_decoder()
    toks = c.sig_to_toks(x[:1280 * n]) if mode == "decode" else None
    ts = []
    for i in range(n):
        inp = x[i * 1280:(i + 1) * 1280] if mode == "full" else toks[i * 4:(i + 1) * 4]
        t0 = time.perf_counter()
        s.push(inp)
        ts.append(time.perf_counter() - t0)
    res[mode] = statistics.median(ts[10:]) * 1e3  # after 10 warm-up pushes
    res[mode + "_min"] = min(ts[10:]) * 1e3
t0 = time.perf_counter()
c.sig_to_toks(x[:16000 * 10])
res["offline10s"] = (time.perf_counter() - t0) * 1e3
print(Path(fastfocal.__file__).parent.parent.name, dtype, " ".join(f"{k}={v:.1f}ms" for k, v in res.items()), flush=True)
