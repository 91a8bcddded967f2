#!/usr/bin/env bash
# The Triton checks that need a CUDA GPU, as one script for a short lease of a GPU machine:
#   bash bench/gpu_checks.sh OUT_DIR [--quick]
# 1. the kernel and triton-backend tests, compiled (the CPU runs them interpreted);
# 2. the kernel benchmark (issue 4's table) and its per-kernel breakdown, as JSON and markdown;
# 3. unless --quick, the tile sweep of the attention kernels and the whole ViT-S (bf16, CUDA
#    graphs) against timm, with the fused gate of an SAE block inside.
# Every step writes into OUT_DIR and the script goes on after a failing step, so one lease gives
# every result it can; the exit status is that of the first failing step.
set -uo pipefail
out="${1:?usage: bash bench/gpu_checks.sh OUT_DIR [--quick]}"
quick="${2:-}"
mkdir -p "$out"
status=0
step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.log, remember the first failure
  local name="$1"; shift
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
step tests python -m pytest -q -x tests/kernels tests/runtime/test_triton_backend.py -p no:cacheprovider
step kernels python -m headsteer.bench.kernels --json "$out/kernels.json" --md "$out/kernels.md"
step breakdown python -m headsteer.bench.kernels --breakdown --json "$out/breakdown.json"
if [ "$quick" != "--quick" ]; then
  step sweep python -m headsteer.bench.kernels --sweep
  step model python -m headsteer.bench --model vit_small_patch16_224 --device cuda --dtype bfloat16 \
    --backends timm,timm-graph,triton-graph --batch 64,8 --usage 1,0.67,0.33,0 --reps 10 --warmup 2 \
    --no-progress --json "$out/model.json" --md "$out/model.md"
fi
exit "$status"
