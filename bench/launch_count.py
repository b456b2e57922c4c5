"""Device launches of one batch-1 streaming step, counted on the CPU: the GPU code path (Triton
kernels under TRITON_INTERPRET=1, everything else as the aten ops that would each be a CUDA
kernel) with its launches listed by name. At batch 1 the step's bytes take ~0.1 ms on an H200
(bench/ROOFLINE.md), so launches set the time: a graph replay costs a few microseconds per node.

    TRITON_INTERPRET=1 python bench/launch_count.py [--mode full] [--preset 50hz_4k_causal] [--where]
    TRITON_INTERPRET=1 python bench/launch_count.py --mode decode --offline 2   # one offline call
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import sys
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    sys.exit("set TRITON_INTERPRET=1 (the Triton kernels run under the interpreter here)")
os.environ["FASTFOCAL_BACKEND"] = "triton"  # the GPU path on CPU tensors

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
import fastfocal  # noqa: E402
from fastfocal import kernels, ops  # noqa: E402
from fastfocal.codec import SAMPLE_RATE_INPUT  # noqa: E402
from fastfocal.pipeline import Pipeline  # noqa: E402

# no device kernel: views, metadata, and the host-side scalars CUDA graphs bake in (reshape is
# not here: it copies when the input cannot be viewed, and a view is caught by `_aliases`)
FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
        "squeeze", "as_strided", "alias", "detach", "unfold", "split", "split_with_sizes",
        "narrow", "unbind", "chunk", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty",
        "is_nonzero", "_local_scalar_dense", "sym_size", "sym_stride", "_reshape_alias", "diagonal"}


STATE = {"counting": False, "in_kernel": False}


class Count(TorchDispatchMode):
    """aten ops outside the Triton launches (the interpreter's own tensor traffic is not a launch)."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.ops = collections.Counter()
        self.bytes = collections.Counter()  # bytes each op writes (what it costs at many streams)
        self.where = collections.Counter() if where else None  # (op, the fastfocal lines that called it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if STATE["counting"] and not STATE["in_kernel"] and name not in FREE and not _aliases(name, out, args):
            self.ops[name] += 1
            if self.where is not None:
                self.where[(name, _site())] += 1
            o = out if isinstance(out, torch.Tensor) else next((t for t in out if isinstance(t, torch.Tensor)), None) \
                if isinstance(out, (tuple, list)) else None
            if o is not None:
                self.bytes[name] += o.numel() * o.element_size()
        return out


def _site() -> str:
    """The innermost two fastfocal frames that led here (the op's wrapper and its caller)."""
    fr = [f for f in traceback.extract_stack() if "/fastfocal/" in f.filename.replace("\\", "/")]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(fr[-2:]))


def _aliases(name: str, out, args) -> bool:
    """An out-of-place op whose result shares an input's storage is a view (no kernel)."""
    if name.endswith("_") or not isinstance(out, torch.Tensor):
        return False
    ptr = out.untyped_storage().data_ptr()
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="50hz_4k_causal")
    ap.add_argument("--mode", default="full", choices=["full", "encode", "decode"])
    ap.add_argument("--streams", type=int, default=1, help="rows stepped together (more than 4 take the cuBLAS path)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="sets the bytes column")
    ap.add_argument("--where", action="store_true", help="also list where each aten op of the session comes from")
    ap.add_argument("--offline", type=float, metavar="SECONDS",
                    help="count one offline call (--mode encode: sig_to_toks, decode: toks_to_sig) on a clip this long "
                         "instead of a streaming step; FASTFOCAL_LARGE_GEMM=1 for the GEMM-tile path")
    args = ap.parse_args()
    codec = fastfocal.random_init(args.preset, seed=0, device="cpu", dtype=args.dtype)
    # as on a GPU: no data-dependent host shortcuts (CUDA graphs bake nothing in)
    ops._host_checks_ok = lambda t: False
    launches: collections.Counter = collections.Counter()
    mods = [importlib.import_module(f"fastfocal.kernels.{m}") for m in kernels.KERNEL_MODULES]
    for m in mods:
        for name in dir(m):
            if name.endswith("_kernel"):
                setattr(m, name, _Counted(getattr(m, name), name, launches))
    if args.offline:
        return offline(codec, args, launches)
    results = {}
    # engine rows: state rows gathered and scattered by a slot index (slots 1..n of n+1); a
    # session: every slot in order, idx None, state used in place
    n = args.streams
    for label, slots, idx in (("engine row (index)", n + 1, torch.arange(1, n + 1)), ("session (in place)", n, None)):
        pipe = Pipeline(codec.model, args.mode, slots)
        T = codec.config.chunk_frames
        x = (torch.randn(n, pipe.chunk) * 0.1).to(codec.dtype) if pipe.takes_audio else torch.randint(0, 4096, (n, T))
        launches.clear()
        with torch.inference_mode():
            pipe.step(x, idx)  # not the first chunk
            mode = Count(where=args.where and idx is None)
            with mode:
                STATE["counting"] = True
                pipe.step(x, idx)
                STATE["counting"] = False
        results[label] = (collections.Counter(launches), mode.ops, mode.bytes)
        if mode.where is not None:
            sites = mode.where
    extra = "".join(f" --{k} {v}" for k, v in (("streams", n), ("dtype", args.dtype)) if v != ap.get_default(k))
    print(f"# Launches of one {n}-stream streaming step ({args.preset}, mode {args.mode}, {args.dtype})\n")
    print(f"`TRITON_INTERPRET=1 python bench/launch_count.py --mode {args.mode}{extra}`\n")
    print("| step | Triton kernels | other device ops (aten: a kernel or a cuBLAS call each) | total |\n|---|---|---|---|")
    for label, (tk, at, _) in results.items():
        print(f"| {label} | {sum(tk.values())} | {sum(at.values())} | {sum(tk.values()) + sum(at.values())} |")
    tk, at, nb = results["engine row (index)"]
    print("\nEngine row, by kind:\n\n| Triton kernel | launches |\n|---|---|")
    for k, v in tk.most_common():
        print(f"| {k} | {v} |")
    sess = results["session (in place)"][1]
    print("\n| aten op | engine row | session | engine row: MB written per stream |\n|---|---|---|---|")
    for k in sorted(set(at) | set(sess), key=lambda k: -max(at.get(k, 0), sess.get(k, 0))):
        print(f"| {k} | {at.get(k, 0)} | {sess.get(k, 0)} | {nb.get(k, 0) / n / 1e6:.3f} |")
    print(f"\naten ops outside the kernels write {sum(nb.values()) / n / 1e6:.2f} MB per stream per step (engine row).")
    if args.where:
        print("\nSession, where each aten op comes from:\n\n| aten op | called at | launches |\n|---|---|---|")
        for (op, site), v in sorted(sites.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"| {op} | {site} | {v} |")


def offline(codec, args, launches: collections.Counter) -> None:
    """One offline call (after a warm one: weight re-layouts are made once), its launches and
    what its aten ops write per audio-second."""
    if args.mode == "full":
        sys.exit("--offline counts one direction: --mode encode or --mode decode")
    n = args.streams
    sig = (torch.randn(n, int(SAMPLE_RATE_INPUT * args.offline)) * 0.1).to(codec.dtype)
    with torch.inference_mode():
        toks = codec.sig_to_toks(sig)
        call = (lambda: codec.sig_to_toks(sig)) if args.mode == "encode" else (lambda: codec.toks_to_sig(toks))
        call()
        launches.clear()
        mode = Count(where=args.where)
        with mode:
            STATE["counting"] = True
            call()
            STATE["counting"] = False
    per = n * args.offline
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("FASTFOCAL_") and k != "FASTFOCAL_BACKEND")
    print(f"# Launches of one offline {args.mode} call ({args.preset}, {n} x {args.offline:g} s, {args.dtype})\n")
    print(f"`{env + ' ' if env else ''}TRITON_INTERPRET=1 python bench/launch_count.py --mode {args.mode} "
          f"--offline {args.offline:g}{f' --streams {n}' if n != 1 else ''}`\n")
    print(f"Triton kernels: {sum(launches.values())}; other device ops (aten): {sum(mode.ops.values())}; "
          f"aten writes {sum(mode.bytes.values()) / per / 1e6:.1f} MB per audio-second "
          "(state allocation is per call, not per second)\n")
    print("| Triton kernel | launches |\n|---|---|")
    for k, v in launches.most_common():
        print(f"| {k} | {v} |")
    print("\n| aten op | launches | MB written per audio-second |\n|---|---|---|")
    for k, v in mode.ops.most_common():
        print(f"| {k} | {v} | {mode.bytes.get(k, 0) / per / 1e6:.1f} |")
    if args.where:
        print("\n| aten op | called at | launches |\n|---|---|---|")
        for (op, site), v in sorted(mode.where.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"| {op} | {site} | {v} |")


class _Counted:
    """Stands in for a kernel: counts fn[grid](...) launches, and keeps the interpreter's own
    tensor traffic out of the aten count."""

    def __init__(self, fn, name, counter):
        self.fn, self.name, self.counter = fn, name, counter

    def __getitem__(self, grid):
        run = self.fn[grid]

        def go(*a, **k):
            if STATE["counting"]:
                self.counter[self.name] += 1
            STATE["in_kernel"] = True
            try:
                return run(*a, **k)
            finally:
                STATE["in_kernel"] = False
        return go

    def __getattr__(self, attr):
        return getattr(self.fn, attr)


if __name__ == "__main__":
    main()
