#!/usr/bin/env bash
# MultiTalk GPU benchmark: the engine's real-shape DiT step (bench/engine.py --gpu) and the plain-PyTorch
# floor (gpu_floor.py) in the same call, on the same card. Not run yet: no GPU was lent to this task.
#
# Before the device call, on the dev machine:
#   mkdir -p build/gpu_floor && cp ../shared/bench/gpu_floor.py build/gpu_floor/   # /build/ is git-ignored
# Device call: run(command="bash bench/engine_gpu.sh", carry=["build/gpu_floor"], timeout_s=560)
# Needs torch (CUDA) and diffusers on the GPU host; results land in $OUT (engine_bench.json, gpu_floor.json,
# the two logs).
set -euo pipefail
OUT="${OUT:-$(pwd)/build/bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
FLOOR="build/gpu_floor/gpu_floor.py"
[ -f "$FLOOR" ] || { [ -f ../shared/bench/gpu_floor.py ] && mkdir -p build/gpu_floor && cp ../shared/bench/gpu_floor.py "$FLOOR"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. the floor first (one block, extrapolated), budget-capped so the engine run keeps its time
if [ -f "$FLOOR" ]; then
  FLOOR_BUDGET_S="${FLOOR_BUDGET_S:-150}" OUT="$OUT" timeout 200 "$PY" "$FLOOR" 2>&1 | tail -n 40 > "$OUT/gpu_floor.tail.log" || echo "gpu_floor.py failed or timed out" | tee -a "$OUT/gpu_floor.tail.log"
else
  echo "gpu_floor.py not carried; the ratio to the floor will be missing" | tee "$OUT/gpu_floor.tail.log"
fi

# 2. the engine: 3-pass batched, 3-pass sequential, 1 pass; s/step, FLOPs, matmul rate, MFU, peak memory
timeout 330 "$PY" bench/engine.py --gpu --repeats 2 --budget-s 300 --floor-json "$OUT/gpu_floor.json" --out "$OUT" 2>&1 | tee "$OUT/engine_bench.log"
