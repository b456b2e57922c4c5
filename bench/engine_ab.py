"""Median wall time of StreamEngine.step_batch() with N streams all ready every step, for the
fastfocal found under a given source tree (A/B of two commits: check one out in a worktree,
link its `kernels/` as `fastfocal/kernels`, and run this once per tree, interleaved).

    python bench/engine_ab.py /path/to/tree 8 bfloat16 full [preset or config.json]
"""
import sys
import time

root, n, dt, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
preset = sys.argv[5] if len(sys.argv) > 5 else "50hz_4k_causal"
sys.path.insert(0, root)

import torch  # noqa: E402

import fastfocal  # noqa: E402
from fastfocal.engine import StreamEngine  # noqa: E402

torch.set_num_threads(1)
codec = fastfocal.random_init(preset, seed=0, device="cpu", dtype=dt)
e = StreamEngine(codec, n, mode=mode, cuda_graphs=False)
g = torch.Generator().manual_seed(0)
xs = [torch.randint(0, codec.codebook_size, (n, 4), generator=g).numpy() if mode == "decode"
      else (torch.randn(n, 1280, generator=g) * 0.1).numpy() for _ in range(4)]
ids = [e.open() for _ in range(n)]
ts = []
for i in range(14):
    e.submit_batch(ids, xs[i % 4])
    t = time.perf_counter()
    e.step_batch()
    ts.append(time.perf_counter() - t)
ts = sorted(ts[4:])
print(f"{fastfocal.__file__} n={n} {dt} {mode}: p50 {ts[len(ts) // 2] * 1e3:.1f} ms  min {ts[0] * 1e3:.1f}")
