#!/usr/bin/env bash
# On a GPU machine: the whole test suite (kernel tests run on CUDA there), then every benchmark,
# in one call, ending with a one-screen summary. It needs well over 15 minutes: with the device
# tool's current budget (15 min per task, start-up included) run bench/gpu_quick.sh instead.
#   bash bench/gpu_check.sh            (QUICK=1 for a shorter sweep; JOBS=n test processes)
# Writes bench/results/gpu-<device>/{pytest.xml,kernels.jsonl,log.txt}; the end-to-end
# benches append to their own files under bench/results/ (rows carry the device name).
# To add a benchmark: one more `step` line below.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=$(python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())" 2>/dev/null) \
    || { echo "gpu_check: no CUDA device found"; exit 2; }
OUT="bench/results/gpu-$(echo "$DEVICE" | tr -c 'A-Za-z0-9_.\n-' '_')"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
Q=${QUICK:+--quick}
FAILED=()
declare -A SECONDS_OF

step() {  # step NAME CMD...: run, log, remember failures and time, carry on
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $* ($(date '+%F %T'))" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || FAILED+=("$name")
    SECONDS_OF[$name]=$((SECONDS - t0))
}

echo "gpu_check on $DEVICE, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

# Test processes share the CPU: with torch's default (one thread per core each) 16 workers on
# 16 cores oversubscribe it and the suite stalls; 2 threads x 8 workers finishes in under a minute.
CORES=$(nproc)
JOBS=${JOBS:-$(( CORES >= 16 ? 8 : (CORES / 2 > 1 ? CORES / 2 : 1) ))}
XDIST=()
if python -c "import xdist" 2>/dev/null && [ "$JOBS" -gt 1 ]; then XDIST=(-n "$JOBS"); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

step tests          python -m pytest -q -p no:cacheprovider "${XDIST[@]}" --junitxml="$OUT/pytest.xml"
step kernels        python bench/kernels/run_all.py $Q --out "$OUT/kernels.jsonl"
step tile-sweep     env PYTHON=python bash bench/kernels/tile_sweep.sh "$OUT/kernels.jsonl"
step e2e            python bench/e2e.py $Q --dtypes float32 bfloat16 float16 --f32-dots ieee bf16x3 tf32x3
step stream-latency python bench/stream_latency.py $Q
step stream-latency-cublas env FASTFOCAL_SKINNY_ROWS=0 python bench/stream_latency.py $Q
step stream-latency-pdl env FASTFOCAL_PDL=1 python bench/stream_latency.py $Q
step serve-capacity python bench/serve_capacity.py $Q
step bf16-agreement python bench/bf16_agreement.py --random-init 50hz_4k_causal --audio tests/data/audio
step engine-host    python bench/engine_host.py --random-init 50hz_4k_causal --device cuda --dtype bf16 --mode full --streams 256,1024,4096 --steps 6
step corpus        python bench/corpus_bench.py --random-init 50hz_4k_causal --dtype bf16 --device cuda --files ${CORPUS_FILES:-600}
step offline-prof   python bench/offline_profile.py --random-init 50hz_4k_causal --dtypes float32 bfloat16 float16
step precision      python bench/precision.py --random-init 50hz_4k_causal --device cuda --files 12 --seconds 8 --f32-dots bf16x3 tf32x3
step readme-perf    python bench/readme_perf.py

# ------------------------------------------------------------------ summary (last screen)
TESTS=$(python - "$OUT/pytest.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    print(f"no junit report ({e})"); sys.exit()
s = root if root.tag == "testsuite" else root.find("testsuite")
n, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{n - f - e - sk} passed, {f} failed, {e} errors, {sk} skipped in {float(s.get('time', 0)):.0f} s")
bad = [f"{c.get('classname')}::{c.get('name')}" for c in s.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
for b in bad[:15]:
    print(f"  FAILED {b}")
if len(bad) > 15:
    print(f"  ... and {len(bad) - 15} more (see the log)")
EOF
)
VERSIONS=$(python -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')" 2>&1)
echo
echo "==================== gpu_check summary ===================="
echo "device:   $DEVICE ($CORES CPU cores; tests: OMP_NUM_THREADS=$OMP_NUM_THREADS ${XDIST[*]:-serial})"
echo "versions: $VERSIONS; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "tests:    $TESTS"
for name in tests kernels tile-sweep e2e stream-latency serve-capacity bf16-agreement engine-host corpus offline-prof precision readme-perf; do
    status=ok
    [ -n "${SECONDS_OF[$name]:-}" ] || status="not run"
    for f in "${FAILED[@]:-}"; do [ "$f" = "$name" ] && status=FAILED; done
    printf '  %-15s %-7s %5s s\n' "$name" "$status" "${SECONDS_OF[$name]:-?}"
done
echo "results:  $OUT/ (pytest.xml, kernels.jsonl, log.txt) and bench/results/"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${FAILED[*]} (see $LOG)"
    exit 1
fi
echo "gpu_check: all passed"
