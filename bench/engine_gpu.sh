#!/usr/bin/env bash
# MultiTalk GPU benchmark in ONE device call, on one card, each stage under its own `timeout` (under 8 min in
# all): (1) the plain-PyTorch floor gpu_floor.py, if carried; (2) bench/engine.py --gpu-speed: the speed
# features at the real 14B shape with random bf16 weights, 448x896, 81 frames, 2 persons, each adding to the
# last: bf16 3 passes, a merged LoRA at 1 pass, + TeaCache, + fp8 (torch._scaled_mm), + regional compile, the
# distilled 8-step chunk against the 15 s goal, the episode on an 8-GPU node, and block offload within 24 GB:
# s/step, peak memory, MFU against the measured matmul and the ratio to the floor.
# ENGINE_GPU_ALL=1 adds the earlier stages (needs a few more minutes than the 8 a call may take with them):
# (3) --gpu-stream: 2 streamed InfiniteTalk V2V chunks through the real pipeline; (4) --gpu: one real-shape
# DiT step, 3 passes batched / sequential, 1 pass.
# Not run yet: no GPU was lent to the tasks that wrote it (bench/engine.py --gpu-speed --check-on-cpu runs the
# same code at the tiny shape).
#
# Preparation on the dev machine, in the root of the checkout the device call sends (the session's own
# checkout, with this branch merged; a helper's worktree does not travel). Both folders are git-ignored.
#   1. Wheels. The GPU image already has torch 2.11, transformers 5.17.0, tokenizers 0.23.2, safetensors
#      0.8.0, huggingface-hub 1.33.0, numpy, scipy, pillow, regex, requests, filelock (device KINDS.md), and
#      the tiny path ran here with that transformers/huggingface-hub pair. Missing there: diffusers, PyAV
#      (the V2V source video) and pyloudnorm (loudness normalisation). Python 3.12, manylinux x86_64:
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#          -d .whl diffusers==0.42.1 av==18.1.0 pyloudnorm==0.2.0
#      = 42.2 MB: av 35.8, diffusers 6.4, pyloudnorm 0.01 (diffusers' other needs are on the image; on 3.12 it
#      takes importlib.metadata from the standard library). The dev venv's transformers 5.25.0 would add 13.8
#      MB plus what it needs that the image lacks at those versions (huggingface-hub 2.4.0 0.9 MB, kernels
#      0.19.1 2.7 MB, tokenizers 0.23.3 3.4 MB): ~62 MB with av, too close to the 64 MiB a call carries, so
#      the image's transformers is used (the JSON records every version).
#   2. mkdir -p build/gpu_floor && cp ../shared/bench/gpu_floor.py build/gpu_floor/
#   3. run(command="bash bench/engine_gpu.sh", carry=[".whl", "build/gpu_floor"], timeout_s=570)
# Results in $OUT: gpu.txt (card, versions, wheel install), gpu_floor.json, gpu_floor.log, gpu_floor.out.log,
# engine_gpu_speed.json, engine_gpu_speed.log (with ENGINE_GPU_ALL=1 also engine_gpu_stream.* and engine_bench.*).
set -uo pipefail # not -e: a failed or timed-out stage must not lose the ones after it
OUT="${OUT:-$(pwd)/build/bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"
FLOOR="build/gpu_floor/gpu_floor.py"
[ -f "$FLOOR" ] || { [ -f ../shared/bench/gpu_floor.py ] && mkdir -p build/gpu_floor && cp ../shared/bench/gpu_floor.py "$FLOOR"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$OUT/gpu.txt" 2>&1 \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || echo "wheel install failed" | tee -a "$OUT/gpu.txt"
fi
"$PY" -c "import torch, diffusers, transformers, av; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'av', av.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

# 1. the floor (one block, extrapolated to 40): its JSON gives the ratio of the engine's step to the floor
if [ -f "$FLOOR" ]; then
  FLOOR_BUDGET_S=60 OUT="$OUT" timeout 80 "$PY" "$FLOOR" 2>&1 | tail -n 60 > "$OUT/gpu_floor.out.log" || echo "gpu_floor.py failed or timed out" | tee -a "$OUT/gpu_floor.out.log"
else
  echo "gpu_floor.py not carried; the ratios to the floor will be missing" | tee "$OUT/gpu_floor.out.log"
fi

# 2. the speed features, one process: the model is built once (~35 GiB bf16) and each feature added in turn
timeout 330 "$PY" bench/engine.py --gpu-speed --repeats 1 --budget-s 300 --floor-json "$OUT/gpu_floor.json" --out "$OUT" 2>&1 | tee "$OUT/engine_gpu_speed.log"

if [ "${ENGINE_GPU_ALL:-0}" = 1 ]; then
  # 3. the streamed render: s/chunk, s/step, per-component time and peak GPU / RSS, 40-step extrapolation,
  #    1-chunk baseline; the report is saved after every render, so a timeout keeps what was measured
  timeout 290 "$PY" bench/engine.py --gpu-stream --steps 4 --budget-s 260 --floor-json "$OUT/gpu_floor.json" --out "$OUT" 2>&1 | tee "$OUT/engine_gpu_stream.log"
  # 4. one DiT step: 3-pass batched, 3-pass sequential, 1 pass; FLOPs, matmul rate, MFU, peak memory
  timeout 110 "$PY" bench/engine.py --gpu --repeats 1 --budget-s 85 --floor-json "$OUT/gpu_floor.json" --out "$OUT" 2>&1 | tee "$OUT/engine_bench.log"
fi
echo "engine_gpu.sh done"
