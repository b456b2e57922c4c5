"""Compile every kernel configuration the launchers pick at real sizes to a CUDA binary, with no
GPU: triton ships ptxas, so a CPU machine can run the whole compiler down to SASS and read its
resource use (registers, spills to local memory, shared memory).

Each launcher is called on CPU tensors with its kernel swapped for a recorder, so the recorded
constexprs and launch options are exactly what it would launch; then each distinct
configuration is compiled for the target. Exit status 1 if any fails to compile.

    python tests/kernels/sm90_compile.py [--arch 90] [--quick]     (TRITON_INTERPRET must be unset)
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

INT_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
             torch.int32: "i32", torch.bool: "i1"}


def _ty(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + INT_TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {type(v)}")


def _div16(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.data_ptr() % 16 == 0
    return isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0


class Recorder:
    """Stands in for a JITFunction: `rec[grid](*args, **kw)` records instead of launching."""

    def __init__(self, fn, log: dict):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=None, **kw):
            vals = dict(zip(self.fn.arg_names, args), **kw)
            sig, consts = {}, {}
            for p in self.fn.params:
                v = vals[p.name]
                if p.is_constexpr:
                    sig[p.name], consts[p.name] = "constexpr", v
                else:
                    sig[p.name] = _ty(v)
            # what the JIT specializes on: 16-byte-aligned pointers, integers divisible by 16
            div = tuple(i for i, p in enumerate(self.fn.params) if not p.is_constexpr and _div16(vals[p.name]))
            key = (self.fn.__name__, tuple(sig.items()), tuple(consts.items()), num_warps, num_stages, div)
            self.log.setdefault(key, (self.fn, sig, consts, num_warps, div, num_stages))
        return launch


def record(quick: bool, pdl: bool = False) -> dict:
    from fastfocal import kernels
    from fastfocal.kernels import _common, attention, bsq, convnext, epilogue, focal_context, linear, modulate, norm, status

    if pdl:  # the configurations a Hopper with FASTFOCAL_PDL=1 launches
        _common.pdl = lambda t: True

    mods = [importlib.import_module(f"fastfocal.kernels.{m}") for m in kernels.KERNEL_MODULES]
    log: dict = {}
    for m in mods:
        m.check_device = lambda *a: None  # CPU tensors stand in for CUDA ones
        for name in dir(m):
            if name.endswith("_kernel"):
                setattr(m, name, Recorder(getattr(m, name), log))
    dtypes = [torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16]
    r = torch.randn
    for dt in dtypes:
        # focal context: streaming steps (C = 1024 and 256), an offline segment, non-causal
        # (64 rows: the window level as a GEMM over the rows, `_window_rows_kernel`)
        for B, T, C, cache in ((4, 4, 1024, True), (64, 4, 1024, True), (4, 4, 256, True), (4, 37, 1024, True), (2, 2048, 1024, False)):
            h = r(B, T, 2 * C + 3, dtype=dt)
            ks = [14, 18, 512]
            ws, bs = [r(C, 1, k, dtype=dt) for k in ks], [r(C, dtype=dt) for _ in ks]
            caches = [r(B, C, focal_context.ring_len(k), dtype=dt) for k in ks] if cache else None
            idx, start = torch.arange(B), torch.full((B,), 1000)
            focal_context.focal_context(h[..., C:2 * C], h[..., 2 * C:], ws, bs, True, caches, idx if cache else None, start if cache else None)
        # long causal runs: every level as a Toeplitz GEMM (offline, and a segment after others)
        h = r(2, 300, 2 * 256 + 3, dtype=dt)
        ws, bs = [r(256, 1, k, dtype=dt) for k in (14, 18, 512)], [r(256, dtype=dt)] * 3
        focal_context.focal_context_long(h[..., 256:512], h[..., 512:], ws, bs)
        caches = [r(2, 256, focal_context.ring_len(k), dtype=dt) for k in (14, 18, 512)]
        focal_context.focal_context_long(h[..., 256:512], h[..., 512:], ws, bs, caches, torch.arange(2), torch.full((2,), 1000))
        h = r(2, 500, 2 * 256 + 3, dtype=dt)
        focal_context.focal_context(h[..., 256:512], h[..., 512:], [r(256, 1, k, dtype=dt) for k in (14, 18)], [r(256, dtype=dt)] * 2, False)
        # attention: streaming step on the ring, long causal input, full attention
        H, d, R = 16, 64, 508
        p = [r(8, d, dtype=dt), r(8, dtype=dt), r(1, H, 1, 1, dtype=dt), r(320, H, dtype=dt)]
        kr, vr = r(4, H, R, d, dtype=dt), r(4, H, R, d, dtype=dt)
        for T, window, ring in ((4, 512, True), (2048, 512, True), (500, None, False)):
            qkv, y = r(2, T, 3 * H * d, dtype=dt), r(2, T, H * d, dtype=dt)
            start = torch.full((2,), 1000)
            attention.rel_attention(qkv, y, *p, H, start, 4, window, 320, 800, kr if ring else None, vr if ring else None, torch.arange(2) if ring else None)
        keys, attention.STREAM_KEYS = attention.STREAM_KEYS, 32  # the key block start-up tuning also times
        attention.rel_attention(r(2, 4, 3 * H * d, dtype=dt), r(2, 4, H * d, dtype=dt), *p, H, torch.full((2,), 1000), 4, 512,
                                320, 800, kr, vr, torch.arange(2))
        attention.STREAM_KEYS = keys
        # few-row matmul + epilogue (a batch-1 step's Linears, modulation, feature-extractor windows)
        x4 = r(1, 4, 1024, dtype=dt)
        linear.linear(x4, r(4096, 1024, dtype=dt), r(4096, dtype=dt), act="gelu")
        linear.linear(r(1, 4, 4096, dtype=dt), r(1024, 4096, dtype=dt), r(1024, dtype=dt), res=x4, gamma=r(1024, dtype=dt))
        linear.linear(x4, r(1024, 1024, dtype=dt), r(1024, dtype=dt), mul=r(1, 4, 2051, dtype=dt)[..., :1024])
        linear.linear(x4, r(480, 1024, dtype=dt), r(480, dtype=dt), act="clamp")
        linear.linear(x4, r(1024, 1024, dtype=dt), r(1024, dtype=dt), act="snake", alpha=r(1024, dtype=dt))
        ln = ("layer_norm", r(1024, dtype=dt), r(1024, dtype=dt), 1e-5)
        linear.linear(x4, r(3072, 1024, dtype=dt), r(3072, dtype=dt), norm=ln, norm_out=torch.empty_like(x4))
        linear.linear(x4, r(4096, 1024, dtype=dt), r(4096, dtype=dt), act="gelu", norm=("dyt", r(1, dtype=dt)))
        linear.linear(x4, r(1024, 1024, dtype=dt), r(1024, dtype=dt), norm=("snake", r(1024, dtype=dt)))
        for C, k, s_, T in ((1, 10, 5, 1280), (512, 3, 2, 256), (512, 2, 2, 16)):  # the feature extractor's streaming convs
            fc = r(4, k - 1, C, dtype=dt)
            linear.causal_conv(r(2, T, C, dtype=dt), r(512, k * C, dtype=dt), k, s_, fc, torch.tensor([3, 1]),
                               torch.tensor([False, True]))
            linear.causal_conv(r(4, T, C, dtype=dt), r(512, k * C, dtype=dt), k, s_, fc)
        fe = r(1, 131, 512, dtype=dt)
        linear.linear(fe.as_strided((1, 64, 1536), (131 * 512, 1024, 1)), r(512, 1536, dtype=dt))
        # many rows (offline, big batches; ops.LARGE_GEMM): GEMM tiles with the epilogues fused
        xm = r(2, 100, 1024, dtype=dt)
        linear.linear(xm, r(4096, 1024, dtype=dt), r(4096, dtype=dt), act="gelu")
        linear.linear(r(2, 100, 4096, dtype=dt), r(1024, 4096, dtype=dt), r(1024, dtype=dt), res=xm, gamma=r(1024, dtype=dt))
        linear.linear(xm, r(1024, 1024, dtype=dt), r(1024, dtype=dt), mul=r(2, 100, 2051, dtype=dt)[..., :1024])
        linear.linear(xm, r(1024, 1024, dtype=dt), r(1024, dtype=dt), act="snake", alpha=r(1024, dtype=dt))
        linear.linear(xm, r(48, 1024, dtype=dt), r(48, dtype=dt), act="clamp")
        fe = r(2, 301, 512, dtype=dt)
        linear.linear(fe.as_strided((2, 150, 1536), (301 * 512, 1024, 1)), r(512, 1536, dtype=dt))
        for B in (1, 64):  # WavLM's positional conv in a step: 128 taps, 16 groups, GELU fused
            linear.grouped_windows(r(B, 131, 1024, dtype=dt), r(1024, 128 * 64, dtype=dt), 128, 16, r(1024, dtype=dt), "gelu")
            # ... and from its ring: a step (the kernel writes the frames) and an offline segment (it cannot)
            for T, S in ((4, B + 1), (200, B)):
                linear.grouped_ring_conv(r(B, T, 1024, dtype=dt), r(1024, 128 * 64, dtype=dt), 128, 16,
                                         r(S, 256, 1024, dtype=dt), torch.arange(B) if S > B else None,
                                         torch.full((B,), 300), r(1024, dtype=dt), "gelu")
        for B, T in ((1, 4), (64, 4), (2, 200)):  # the decoder's embedding conv from its ring (zero padding)
            linear.causal_ring_conv(r(B, T, 1024, dtype=dt), r(1024, 7 * 1024, dtype=dt), 7, r(B + 1, 16, 1024, dtype=dt),
                                    torch.arange(B), torch.full((B,), 30), r(1024, dtype=dt), False)
        for C, k, s_, T in ((1, 10, 5, 1280), (512, 3, 2, 256)):  # the same convs at 64 streams
            linear.causal_conv(r(64, T, C, dtype=dt), r(512, k * C, dtype=dt), k, s_, r(64, k - 1, C, dtype=dt))
            # ... with their LayerNorm + GELU in the epilogue (ops.causal_conv_ln_gelu, many windows)
            linear.causal_conv(r(64, T, C, dtype=dt), r(512, k * C, dtype=dt), k, s_, r(64, k - 1, C, dtype=dt),
                               fresh=torch.full((64,), 3), post_norm=(r(512, dtype=dt), r(512, dtype=dt), 1e-5, True))
        status.row_status(r(4, 1280), [r(4, 4, 12, dtype=dt), r(4, 1920, dtype=dt)], 1e3, 4)
        ix = torch.arange(4)  # ... and the four stages' frame counts advanced in the same launch
        status.row_status(r(4, 1280), [r(4, 4, 12, dtype=dt)], 1e3, 4,
                          [(torch.zeros(5, dtype=torch.long), ix, torch.zeros(4, dtype=torch.long), 4) for _ in range(4)])
        # epilogues, norms, modulate, BSQ, ConvNeXt front
        for shape in ((4, 4), (8, 2048)):
            for C, kw in ((4096, dict(act="gelu")), (1024, dict(res=r(*shape, 1024, dtype=dt), gamma=r(1024, dtype=dt))),
                          (480, dict(act="clamp")), (1024, dict(act="snake", alpha=r(1024, dtype=dt)))):
                epilogue.epilogue(r(*shape, C, dtype=dt), r(C, dtype=dt), **kw)
            for C in (1024, 256):
                x = r(*shape, C, dtype=dt)
                norm.norm(x, r(C, dtype=dt), r(C, dtype=dt), 1e-5, res=r(*shape, C, dtype=dt), h_bias=r(C, dtype=dt))
                norm.norm(x, alpha=r(1, dtype=dt), res=r(*shape, C, dtype=dt), h_bias=r(C, dtype=dt))
            norm.norm(r(*shape, 512, dtype=dt), r(512, dtype=dt), r(512, dtype=dt), 1e-5, act_gelu=True)
            # ... with the conv's cache write before it on the side (the feature extractor's streaming convs)
            norm.norm(r(*shape, 512, dtype=dt), r(512, dtype=dt), r(512, dtype=dt), 1e-5, act_gelu=True,
                      tail=(r(shape[0], 16, 512, dtype=dt), r(shape[0] + 1, 2, 512, dtype=dt), torch.arange(shape[0])))
            modulate.modulate(r(*shape, 2 * 1024 + 3, dtype=dt)[..., :1024], r(*shape, 1024, dtype=dt), r(1024, dtype=dt))
            lat = r(*shape, 12, dtype=dt)
            bsq.bsq(lat)
            bsq.bsq(lat, quantize=False)
            bsq.bsq(lat, normalize=False)
            bsq.code_proj(torch.randint(0, 4096, shape), r(256, 12, dtype=dt), r(256, dtype=dt), 12, dt)
            bsq.code_proj(lat, r(256, 12, dtype=dt), r(256, dtype=dt))
            x = r(*shape, 1024, dtype=dt)
            cp = [r(1024, 1, 7, dtype=dt), r(1024, dtype=dt), r(1024, dtype=dt), r(1024, dtype=dt)]
            convnext.dwconv_layer_norm(x, *cp, 1e-6, True, r(shape[0], 1024, 6, dtype=dt), torch.arange(shape[0]))
            convnext.dwconv_layer_norm(x, *cp, 1e-6, False)
    return log


def _pdl_ok(name: str, consts: dict, ptx: str) -> bool:
    """A kernel launched with PDL waits on the grid dependency (else it could read its inputs
    before the previous kernel wrote them) and lets its dependents launch; PDL 2 (few-row
    matmul) also prefetches its weights into L2 before the wait."""
    if not consts.get("PDL"):
        return False
    wait = ptx.find("griddepcontrol.wait")
    if wait < 0 or "griddepcontrol.launch_dependents" not in ptx:
        return False
    if consts["PDL"] == 2:
        pf = ptx.find("prefetch.global.L2")
        return 0 <= pf < wait
    return True


def _loops(cuobjdump: Path, cubin: bytes) -> list[str]:
    """Each loop of the SASS (a backward branch), innermost last: its instruction count and
    how many are global loads, FP adds/multiplies/FMAs and warp shuffles."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True).stdout
    ins = {}
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins[int(m.group(1), 16)] = m.group(2)
    def counts(body):
        n = lambda *ops: sum(any(f" {o}" in f" {v}" for o in ops) for v in body)  # noqa: E731
        return (f"{len(body)} instructions, {n('LDG')} LDG, {n('FFMA', 'FMUL', 'FADD', 'HFMA2', 'HMUL2', 'HADD2')} FP, "
                f"{n('SHFL')} SHFL, {n('HMMA', 'HGMMA')} MMA")

    out = [f"whole kernel (static): {counts(list(ins.values()))}"]
    for a, text in ins.items():
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a:
            body = [v for x, v in ins.items() if int(m.group(1), 16) <= x <= a]
            out.append(f"loop {int(m.group(1), 16):#06x}-{a:#06x}: {counts(body)}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="bf16 only")
    ap.add_argument("--pdl", action="store_true", help="the kernels as FASTFOCAL_PDL=1 launches them (programmatic "
                    "dependent launch): each must wait on the grid dependency, few-row matmuls prefetch their weights")
    ap.add_argument("--only", help="compile only the kernels whose name contains this")
    ap.add_argument("--loops", action="store_true", help="also print each loop's SASS: instructions, global loads, "
                    "FP ops and shuffles per iteration (what an issue-bound kernel costs per trip)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the compiler needs real JIT functions")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", args.arch, 32)
    configs = record(args.quick, args.pdl)
    failed = 0
    print(f"{len(configs)} kernel configurations for sm_{args.arch}")
    if args.only:
        configs = {k: v for k, v in configs.items() if args.only in k[0]}
    for (name, *_), (fn, sig, c, nw, div, ns) in sorted(configs.items(), key=lambda kv: kv[0][0]):
        t = time.time()
        short = " ".join(f"{k}={v}" for k, v in c.items() if k != "INTERP")
        dtypes = sorted({v for v in sig.values() if v.startswith("*") and v[1:] in ("fp32", "bf16", "fp16")})
        try:
            attrs = {(i,): [["tt.divisibility", 16]] for i in div}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=c, attrs=attrs), target=target, options={"num_warps": nw, **({"num_stages": ns} if ns else {})})
        except Exception as e:  # report every failure, not just the first
            failed += 1
            print(f"FAIL {name} {dtypes} {short}: {type(e).__name__}: {str(e)[:400]}")
            continue
        if args.pdl and not _pdl_ok(name, c, k.asm["ptx"]):
            failed += 1
            print(f"FAIL {name} {dtypes} {short}: PDL launch without griddepcontrol.wait, or a few-row matmul without its prefetch")
            continue
        use = "?"
        if cuobjdump.exists():
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            use = " ".join(w for w in out.split() if w.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))
        print(f"ok   {name:22s} {','.join(dtypes):10s} warps={nw} {use:40s} {time.time() - t:4.1f}s  {short}")
        if args.loops and cuobjdump.exists():
            for line in _loops(cuobjdump, k.asm["cubin"]):
                print("       " + line)
    print(f"{len(configs) - failed}/{len(configs)} compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
