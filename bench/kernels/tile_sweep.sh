#!/usr/bin/env bash
# The streaming tiles of the focal ring kernel (fused and rows forms), the attention ring loop and the few-row matmul,
# one process per tile (the launchers read their override at import), appended to OUT_JSONL.
#   bash bench/kernels/tile_sweep.sh OUT_JSONL   (FOCAL_TILES / FOCAL_ROWS_TILES / ATTN_TILES / LINEAR_TILES: space-separated lists)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_JSONL=$1
PY=${PYTHON:-python3}
rc=0
for tile in ${FOCAL_TILES:-8,128,4 16,64,4 16,128,8 4,256,4 8,256,8}; do  # channels,slots,warps
    echo "-- focal_context tile $tile"
    FASTFOCAL_FOCAL_TILE=$tile timeout 90 $PY bench/kernels/bench_focal_context.py --quick --dtypes bfloat16 --out "$OUT_JSONL" || rc=1
done
for tile in ${FOCAL_ROWS_TILES:-4,64,4 2,64,2 8,32,4 4,128,8}; do  # rows,channels,warps (many-row steps)
    echo "-- focal_context rows tile $tile"
    FASTFOCAL_FOCAL_ROWS_TILE=$tile timeout 90 $PY bench/kernels/bench_focal_context.py --quick --dtypes bfloat16 --no-compile --out "$OUT_JSONL" || rc=1
done
for tile in ${ATTN_TILES:-32,8,3 64,8,3 32,4,3 64,4,4 32,8,4}; do  # keys,warps,stages
    echo "-- attention tile $tile"
    FASTFOCAL_ATTN_TILE=$tile timeout 90 $PY bench/kernels/bench_attention.py --quick --dtypes bfloat16 --out "$OUT_JSONL" || rc=1
done
echo "-- linear default tiles"
timeout 90 $PY bench/kernels/bench_linear.py --quick --dtypes bfloat16 --no-compile --out "$OUT_JSONL" || rc=1
for tile in ${LINEAR_TILES:-16,128,4,4 16,256,4,4 16,512,4,4 32,256,4,3 16,512,8,3}; do  # block_n,block_k,warps,stages
    echo "-- linear tile $tile"
    FASTFOCAL_LINEAR_TILE=$tile timeout 90 $PY bench/kernels/bench_linear.py --quick --dtypes bfloat16 --no-compile --out "$OUT_JSONL" || rc=1
done
exit $rc
