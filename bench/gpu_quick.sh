#!/usr/bin/env bash
# One device call of about 8 minutes: the GPU truth for the changes made without a GPU (focal
# rings, attention bias table, ConvNeXt tiles, sessions in place), with their predictions
# (bench/ROOFLINE.md) checked in one go. For the whole suite and every bench: bench/gpu_check.sh.
#
#   device tool: run(command="bash bench/gpu_quick.sh", carry=[".whl"], timeout_s=560)
#
# .whl holds cp312 wheels of what the device image lacks (soundfile, soxr, cffi, pycparser,
# nvtx; how to fetch them: /work/.library/device/README.md, Notes). Results: $OUT/gpu_quick.tgz
# (logs, kernels.jsonl, bench rows) and a summary at the end of the output.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_quick: wheel install failed"; exit 2; }
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
    || { echo "gpu_quick: pip install -e . failed"; exit 2; }
R=${OUT:-/tmp/gpu_quick_out}/r
mkdir -p "$R"
LOG="$R/log.txt"
note() { echo "== $* ($(date '+%T'))" | tee -a "$LOG"; }
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)" 2>&1 | tee -a "$LOG"
git rev-parse --short HEAD 2>/dev/null | tee -a "$LOG"

note "kernel tests on CUDA (focal, attention, ConvNeXt, model)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_focal_context.py tests/kernels/test_attention.py \
    tests/kernels/test_convnext.py tests/kernels/test_linear.py tests/kernels/test_status.py tests/kernels/test_model_triton.py \
    tests/test_streaming.py tests/test_golden.py 2>&1 | tail -15 | tee -a "$LOG"

note "focal, attention and few-row matmul tile sweeps (prediction: focal at 1024 streams <= 5 ms, was 28.9 ms; linear >= cublas+epi)"
FOCAL_TILES="8,128,4 16,64,4 16,128,8 4,256,4" ATTN_TILES="32,8,3 64,8,3 32,4,3 64,4,4" LINEAR_TILES="16,512,4,4 32,256,4,3" \
    bash bench/kernels/tile_sweep.sh "$R/kernels.jsonl" 2>&1 | grep -E "^--|stream|M=|rror" | tee -a "$LOG"
note "batch-1 step latency (prediction: launch-bound; 144 launches with the few-row kernel, 244 without)"
timeout 90 python3 bench/stream_latency.py --quick 2>&1 | tail -12 | tee -a "$LOG"
note "batch-1 step latency on cuBLAS + separate epilogues/norms (FASTFOCAL_SKINNY_ROWS=0), the A/B baseline"
FASTFOCAL_SKINNY_ROWS=0 timeout 90 python3 bench/stream_latency.py --quick 2>&1 | tail -12 | tee -a "$LOG"
note "engine capacity (1024-stream full step was 55.8 ms)"
timeout 150 python3 bench/serve_capacity.py --quick 2>&1 | tail -15 | tee -a "$LOG"
cp bench/results/*.jsonl "$R/" 2>/dev/null
tar czf "${OUT:-/tmp/gpu_quick_out}/gpu_quick.tgz" -C "$R" .
echo "gpu_quick: done; results in gpu_quick.tgz"
