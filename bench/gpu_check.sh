#!/usr/bin/env bash
# On a GPU machine: the GPU tests and every benchmark, in one call.
#   bash bench/gpu_check.sh            (QUICK=1 for a shorter sweep)
# Writes bench/results/gpu-<device>/{pytest-gpu.xml,kernels.jsonl,log.txt}; the end-to-end
# benches append to their own files under bench/results/ (rows carry the device name).
# To add a benchmark: one more `step` line below.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=$(python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())" 2>/dev/null) \
    || { echo "gpu_check: no CUDA device found"; exit 2; }
OUT="bench/results/gpu-$(echo "$DEVICE" | tr -c 'A-Za-z0-9_.\n-' '_')"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
Q=${QUICK:+--quick}
FAILED=()

step() {  # step NAME CMD...: run, log, remember failures, carry on
    local name=$1; shift
    echo "== $name: $* ($(date '+%F %T'))" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || FAILED+=("$name")
}

echo "gpu_check on $DEVICE, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

step gpu-tests      python -m pytest -q -m gpu --junitxml="$OUT/pytest-gpu.xml"
step kernels        python bench/kernels/run_all.py $Q --out "$OUT/kernels.jsonl"
step e2e            python bench/e2e.py $Q
step stream-latency python bench/stream_latency.py $Q
step serve-capacity python bench/serve_capacity.py $Q
step bf16-agreement python bench/bf16_agreement.py --random-init 50hz_4k_causal --audio tests/data/audio
step readme-perf    python bench/readme_perf.py

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${FAILED[*]} (see $LOG)"
    exit 1
fi
echo "gpu_check: all passed; results in $OUT and bench/results/"
