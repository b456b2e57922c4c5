"""Wall time per `fastfocal.ops` function in a batch-1 CPU step (outermost calls only), so a
profile names model-level ops (attention, focal context, each Linear kind) rather than aten ops.

    python bench/cpu_ops.py --dtype fp32 --mode full [--steps 20]
"""
import argparse
import collections
import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import cpu_step as cs  # noqa: E402

import fastfocal  # noqa: E402
from fastfocal import ops  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
ap.add_argument("--mode", default="full", choices=["full", "decode", "encode"])
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--preset", default="50hz_4k_causal", help="preset or config.json (random weights)")
a = ap.parse_args()
torch.set_num_threads(a.threads)
codec = fastfocal.random_init(a.preset, seed=0, device="cpu", dtype={"fp32": "float32", "bf16": "bfloat16"}[a.dtype])
inputs = cs.chunks_for(codec, a.mode, cs.speech(20))
step = cs.fastfocal_step(codec, a.mode)
acc, cnt, depth = collections.defaultdict(float), collections.Counter(), [0]


def wrap(name):
    f = getattr(ops, name)

    def g(*args, **kw):
        depth[0] += 1
        t = time.perf_counter()
        try:
            return f(*args, **kw)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                acc[name] += time.perf_counter() - t
                cnt[name] += 1
    setattr(ops, name, g)


for n in dir(ops):
    f = getattr(ops, n)
    if inspect.isfunction(f) and not n.startswith("_") and getattr(f, "__module__", "") == "fastfocal.ops" and n not in ("backend", "use_triton"):
        wrap(n)
for i in range(10):
    step(inputs[i % len(inputs)])
acc.clear()
cnt.clear()
total = 0.0
for i in range(a.steps):
    t = time.perf_counter()
    step(inputs[i % len(inputs)])
    total += time.perf_counter() - t
N = a.steps
print(f"{a.mode} {a.dtype} {a.threads} thread(s), commit {cs.commit()}: step {total / N * 1e3:.1f} ms, "
      f"in ops {sum(acc.values()) / N * 1e3:.1f} ms")
for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
    print(f"  {k:28s} {v / N * 1e3:7.2f} ms  {cnt[k] // N:4d} calls/step")
