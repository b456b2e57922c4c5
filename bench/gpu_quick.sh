#!/usr/bin/env bash
# One device call of at most BUDGET seconds (default 540): the GPU truth for the changes made
# without a GPU, most valuable first, each step capped by what is left of the budget and the
# results re-packed after every step, so a call cut short still brings back what it measured.
# A lent task has ~15 minutes of device time in all, start-up included: one call of this.
# For the whole suite and every bench: bench/gpu_check.sh.
#
#   device tool: run(command="bash bench/gpu_quick.sh", carry=[".whl"], timeout_s=570)
#
# .whl holds cp312 wheels of what the device image lacks (soundfile, soxr, cffi, pycparser,
# nvtx): `bash bench/device_wheels.sh` fetches them here first. Results: $OUT/gpu_quick.tgz
# (log, kernels.jsonl, bench rows) and the log's last lines in the output.
set -uo pipefail
cd "$(dirname "$0")/.."
# the defaults, untuned, so each A/B below compares what it names; the tactics step times them all
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 FASTFOCAL_TUNE=0
BUDGET=${BUDGET:-540}
START=$SECONDS
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_quick: wheel install failed"; exit 2; }
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
    || { echo "gpu_quick: pip install -e . failed"; exit 2; }
OUTDIR=${OUT:-/tmp/gpu_quick_out}
R=$OUTDIR/r
mkdir -p "$R"
LOG="$R/log.txt"
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)" 2>&1 | tee -a "$LOG"
git rev-parse --short HEAD 2>/dev/null | tee -a "$LOG"

NSTEP=0
pack() {  # bench rows and logs into one file (the device returns at most 8)
    cp bench/results/*.jsonl "$R/" 2>/dev/null
    tar czf "$OUTDIR/gpu_quick.tgz.tmp" -C "$R" . && mv "$OUTDIR/gpu_quick.tgz.tmp" "$OUTDIR/gpu_quick.tgz"
}
step() {  # step CAP_S "what it checks" CMD...: run under min(CAP_S, budget left), log the tail
    local cap=$1 what=$2; shift 2
    local left=$((BUDGET - (SECONDS - START) - 10))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 20 ]; then echo "== skipped (budget spent): $what" | tee -a "$LOG"; return; fi
    NSTEP=$((NSTEP + 1))
    local txt="$R/step$NSTEP.txt"  # each step's whole output comes back (the log keeps its tail)
    echo "== $what (cap ${cap}s, $(date '+%T'))" | tee -a "$LOG"
    timeout "$cap" "$@" > "$txt" 2>&1
    local rc=$?
    tail -25 "$txt" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || echo "== rc $rc" | tee -a "$LOG"
    pack
}

# most valuable first: GPU correctness, the issue-11 targets, the issue-12 offline targets, then the A/B pairs
step 90 "kernel and model tests on CUDA" \
    python3 -m pytest -q -p no:cacheprovider -n 8 -k "not pdl" tests/kernels/test_focal_context.py tests/kernels/test_attention.py \
    tests/kernels/test_convnext.py tests/kernels/test_linear.py tests/kernels/test_status.py tests/kernels/test_model_triton.py \
    tests/kernels/test_large_state.py tests/kernels/test_f32_dot.py \
    tests/test_streaming.py tests/test_golden.py
step 75 "bf16 full-duplex step vs streams up to 1024 (target <= 12 ms at 1024; was 55.8 ms)" \
    python3 bench/serve_capacity.py --modes full --dtypes bfloat16 --max-streams 1024 --reps 30 --no-refine
step 120 "start-up tactic choice, bf16 full engine up to 1024 streams: every switch (PDL, GEMM tiles, focal many-row form, attention 32/64 keys) timed at every bucket (predictions: PDL wins at 1-4 rows, the focal rows form from 64, 64 keys everywhere)" \
    env FASTFOCAL_TUNE=1 python3 bench/tactics_report.py --mode full --dtype bfloat16 --max-streams 1024
step 45 "tuned engines and sessions compute what the defaults do (float32: bit for bit; bf16: tokens agree)" \
    env FASTFOCAL_TUNE=1 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py -k "tuned or every_bucket or session_graphs"
step 100 "bf16 capacity targets, tuned engines as shipped: full 6000, encode 8000, decode 25000 streams at p99 <= 80 ms" \
    env FASTFOCAL_TUNE=1 python3 bench/serve_capacity.py --dtypes bfloat16 --reps 20 --probe full:6000 encode:8000 decode:25000
step 75 "offline bf16 at batch 64: cuBLAS + epilogues and the focal levels as GEMMs (auto), GEMM-tile kernel (gemm), reference (torch); targets encode >= 25,000, decode >= 40,000 audio-s/s" \
    python3 bench/e2e.py --dtypes bfloat16 --backends auto gemm torch --batches 64 --seconds 10 --reps 2 --steps 20
step 100 "float32 with split tensor-core dots, offline at batch 64 (FASTFOCAL_F32_DOT; prediction: bf16x3 encode 3,500-5,000 audio-s/s against ieee's 1,798 and upstream fp32's 2,537; tf32x3 between), then bf16x3 on 128x128x32 8-warp GEMM tiles (no spills but two conv configs on sm_90)" \
    bash -c "python3 bench/e2e.py --dtypes float32 --f32-dots ieee bf16x3 tf32x3 --backends auto --batches 64 --seconds 10 --reps 2 --steps 20 --tag gpu-f32dot \
        && FASTFOCAL_GEMM_TILE=128,128,32,8,3 python3 bench/e2e.py --dtypes float32 --f32-dots bf16x3 --backends auto --batches 64 --seconds 10 --reps 2 --steps 20 --tag gpu-f32dot-tile128"
step 60 "split-dot tokens against float32 on the 2 speech files the repo carries, full-size random model (emulated on CPU: bf16x3 and tf32x3 100.00 %, fp16 99.05 %)" \
    python3 bench/precision.py --random-init 50hz_4k_causal --audio tests/data/audio --files 2 --seconds 20 --device cuda --f32-dots bf16x3 tf32x3
step 40 "batch-1 full step, few-row kernel (prediction ~0.85 ms bf16, was 1.83; 121 launches)" \
    python3 bench/stream_latency.py --modes full --steps 200
step 75 "focal/attention streaming tiles, old against new default (prediction: focal fused 16,64,4 faster than 8,128,4 at 1 row; at 64 and 4096 rows triton (rows form) ~4x faster than triton-fused; attention 64,8,3 faster than 32,8,3)" \
    env FOCAL_TILES="8,128,4 16,64,4" FOCAL_ROWS_TILES="4,64,4 2,64,2" ATTN_TILES="32,8,3 64,8,3" LINEAR_TILES=" " \
    bash bench/kernels/tile_sweep.sh "$R/kernels.jsonl"
step 40 "batch-1 full step on cuBLAS + separate epilogues/norms (FASTFOCAL_SKINNY_ROWS=0, 244 launches)" \
    env FASTFOCAL_SKINNY_ROWS=0 python3 bench/stream_latency.py --modes full --dtypes bfloat16 --steps 200
step 60 "float32 full engine step at 1024 streams, IEEE then bf16x3 dots (was 129.7 ms IEEE; prediction bf16x3 60-90 ms: GEMMs on tensor cores, state bytes still float32)" \
    bash -c "python3 bench/serve_capacity.py --modes full --dtypes float32 --probe full:1024 --reps 10 \
        && FASTFOCAL_F32_DOT=bf16x3 python3 bench/serve_capacity.py --modes full --dtypes float32 --probe full:1024 --reps 10"
pack
echo "gpu_quick: done in $((SECONDS - START)) s; results in gpu_quick.tgz"
