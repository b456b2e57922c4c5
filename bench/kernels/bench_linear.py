"""The matmul with its epilogue / pre-norm inside (`kernels/linear.py`) against what the GPU path
runs without it: cuBLAS, then the epilogue or norm kernel ("cublas+epi"); "torch" is the eager
reference. Few rows (a batch-1 streaming step): bytes are the weight (the rest is noise at 4
rows), so GB/s is the weight-read rate. Many rows (GEMM tiles, `ops.LARGE_GEMM`: offline runs,
big batches): bytes are x + W + out (+ res / q), and "windows" is a feature-extractor conv
whose overlapping windows the kernel reads in place where cuBLAS needs the unfold copy. The
"cublas+epi" / "triton" ratio at these rows decides whether LARGE_GEMM becomes the default.

    python bench/kernels/bench_linear.py [--quick] [--dtypes ...] [--no-compile]
"""
import sys

import torch
import torch.nn.functional as F
from common import main

from fastfocal.kernels import epilogue as ep
from fastfocal.kernels import linear as lin
from fastfocal.kernels import norm as kn


def cases(gpu, quick):
    # (rows, K, N, epilogue): FFN in (GELU), FFN / ConvNeXt out (residual), WavLM qkv behind
    # LN_a (stored for the gate), focal in_proj behind DynamicTanh, context_proj (q *), a
    # feature-extractor conv over 64 windows
    out = [(4, 1024, 4096, "gelu"), (4, 4096, 1024, "residual"), (4, 1024, 3072, "layer_norm"),
           (4, 1024, 2051, "dyt"), (4, 1024, 1024, "mul"), (64, 1536, 512, "none")]
    if gpu and not quick:
        out += [(16, 1024, 4096, "gelu"), (16, 4096, 1024, "residual")]
    if gpu:  # many rows: 64 x 10 s offline (32,000 frames), WavLM FFN, modulation, decoder FFN, FE conv
        out += [(32000, 1024, 4096, "gelu"), (32000, 4096, 1024, "residual"), (32000, 1024, 1024, "mul"),
                (32000, 1024, 2048, "gelu"), (64 * 3999, 1536, 512, "windows")]
        if not quick:
            out += [(4096, 1024, 4096, "gelu"), (4096, 1536, 512, "windows"), (32000, 1024, 1024, "none")]
    return [dict(M=m, K=k, N=n, epi=e) for m, k, n, e in out]


def make(case, dtype, device):
    M, K, N, epi = case["M"], case["K"], case["N"], case["epi"]
    if epi == "windows":  # conv k=3 stride 2 over C = K / 3 channels: M windows of B = 64 rows
        C, B = K // 3, 64
        T = 2 * (M // B) + 1
        sig = torch.randn(B, T, C, device=device, dtype=dtype)
        x = sig.as_strided((B, M // B, K), (T * C, 2 * C, 1))
        w = torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5
        fused = lambda: lin.linear(x, w)  # noqa: E731
        split = ref = lambda: F.linear(x.reshape(B, -1, K), w)  # noqa: E731  (reshape: the unfold copy)
        nbytes = (sig.numel() + w.numel() + M * N) * sig.element_size()
        return {"triton": fused, "cublas+epi": split, "torch": ref}, nbytes, f"windows M={M} K={K} N={N}"
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5
    b = torch.randn(N, device=device, dtype=dtype)
    g, nb = torch.randn(K, device=device, dtype=dtype), torch.randn(K, device=device, dtype=dtype)
    alpha = torch.ones(1, device=device, dtype=dtype)
    res = torch.randn(M, N, device=device, dtype=dtype)
    q = torch.randn(M, 2 * N + 3, device=device, dtype=dtype)[:, :N]
    if epi == "gelu":
        fused = lambda: lin.linear(x, w, b, "gelu")  # noqa: E731
        split = lambda: ep.epilogue(F.linear(x, w), b, "gelu")  # noqa: E731
        ref = lambda: F.gelu(F.linear(x, w, b))  # noqa: E731
    elif epi == "residual":
        fused = lambda: lin.linear(x, w, b, res=res)  # noqa: E731
        split = lambda: ep.epilogue(F.linear(x, w), b, res=res)  # noqa: E731
        ref = lambda: res + F.linear(x, w, b)  # noqa: E731
    elif epi == "layer_norm":
        y = torch.empty_like(x)
        fused = lambda: lin.linear(x, w, b, norm=("layer_norm", g, nb, 1e-5), norm_out=y)  # noqa: E731
        split = lambda: F.linear(kn.norm(x, g, nb, 1e-5), w, b)  # noqa: E731
        ref = lambda: F.linear(F.layer_norm(x, (K,), g, nb, 1e-5), w, b)  # noqa: E731
    elif epi == "dyt":
        fused = lambda: lin.linear(x, w, b, norm=("dyt", alpha))  # noqa: E731
        split = lambda: F.linear(kn.norm(x, alpha=alpha), w, b)  # noqa: E731
        ref = lambda: F.linear(torch.tanh(alpha * x), w, b)  # noqa: E731
    elif epi == "mul":
        fused = lambda: lin.linear(x, w, b, mul=q)  # noqa: E731
        split = ref = lambda: q * F.linear(x, w, b)  # noqa: E731
    else:
        fused = lambda: lin.linear(x, w)  # noqa: E731
        split = ref = lambda: F.linear(x, w)  # noqa: E731
    nbytes = w.numel() * w.element_size()
    if M > lin.FEW_ROWS:
        nbytes += (x.numel() + M * N * (2 if epi in ("residual", "mul") else 1)) * x.element_size()
    return {"triton": fused, "cublas+epi": split, "torch": ref}, nbytes, f"{epi} M={M} K={K} N={N}"


if __name__ == "__main__":
    main("linear", cases, make, sys.argv[1:])
