#!/usr/bin/env bash
# The Triton checks that need a CUDA GPU, as one script for a short lease of a GPU machine:
#   bash bench/gpu_checks.sh OUT_DIR [--quick]
# Most valuable first, each step under its own time limit (565 s in all: give the lease ~595 s)
# so the script always finishes and packs what it has:
# 0. unless --quick, the kernels of every timing step below compiled at once, one process per
#    CPU, into Triton's on-disk cache (`--warm-up`): one timing process compiles serially (a TopK
#    gate takes 2-3 s to compile, ~100 of them in the sweeps), so without it the sweeps spend
#    their limits compiling;
# 1. the kernel benchmark (issue 4's table), as JSON and markdown;
# 2. the kernel and triton-backend tests, compiled (the CPU runs them interpreted), spread over
#    the CPUs with pytest-xdist since compiling the kernels for each shape dominates; verbose, so
#    a step cut by its limit still logs each finished test's outcome. A kernel that faults fails
#    its own test (tests/conftest.py synchronizes after each one) and then ends that xdist worker
#    (a faulted CUDA context stays broken; xdist starts a fresh worker for the rest);
# 3. the per-kernel breakdown of the attention branch (printed row by row);
# 4. the whole ViT-S (bf16, CUDA graphs) against timm;
# 5. where Nsight Compute is installed, its counters for one launch of the gate and of each branch
#    (`--profile`: duration, occupancy, warp stall reasons), and stall samples by source line for the
#    gate and for ViT-B's QKV and output projections;
# 6. unless --quick, the attention tile sweep and the fused gate's sweep;
# 7. the tests of the opt-in tilings, compiled.
# Everything lands in OUT_DIR/gpu_checks/ and is packed into OUT_DIR/gpu_checks.tar.gz (a lease
# returns only a few files). The exit status is that of the first failing step.
set -uo pipefail
out="${1:?usage: bash bench/gpu_checks.sh OUT_DIR [--quick]}"
quick="${2:-}"
dir="$out/gpu_checks"
mkdir -p "$dir"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to NAME.log, remember the first failure
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$dir/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $((SECONDS - start))s" | tee -a "$dir/$name.log"
  tail -n 30 "$dir/$name.log"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
pack() { tar -czf "$out/gpu_checks.tar.gz" -C "$out" gpu_checks && echo "packed $out/gpu_checks.tar.gz"; }
trap pack EXIT
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u +"%Y-%m-%d %H:%M UTC"; } >"$dir/gpu.txt" 2>&1
cat "$dir/gpu.txt"
workers=$(( $(nproc) > 16 ? 16 : $(nproc) ))
if [ "$quick" != "--quick" ]; then  # (--quick skips the sweeps, most of what it compiles)
  step warm_up 45 python -m headsteer.bench.kernels --warm-up --jobs "$workers" --seconds 35
fi
step kernels 45 python -m headsteer.bench.kernels --json "$dir/kernels.json" --md "$dir/kernels.md"
variants="test_tile_variants"  # the opt-in configurations' tests, last
# The Triton paths first, the model-level parity and CUDA-graph replay first of all (its limit
# cut the step at 45% on 2026-11-27, before it reached them); every file of tests/kernels is
# named (a test checks).
tests=(python -m pytest -v -rfE -n "$workers" -p no:cacheprovider tests/runtime/test_triton_backend.py
  tests/runtime/test_cuda_graph.py tests/kernels/test_triton_sae_gate.py tests/kernels/test_triton_head_attention.py
  tests/kernels/test_fast_gate.py tests/kernels/test_compact.py tests/kernels/test_launch_math.py
  tests/kernels/test_spec_conformance.py tests/kernels/test_aot_compile.py)
step tests 230 "${tests[@]}" -k "not ($variants)"
step breakdown 35 python -m headsteer.bench.kernels --breakdown --json "$dir/breakdown.json"
step model 25 python -m headsteer.bench --model vit_small_patch16_224 --device cuda --dtype bfloat16 \
  --backends timm,timm-graph,triton-graph --batch 64,8 --usage 1,0.67,0.33,0 --reps 10 --warmup 2 \
  --no-progress --json "$dir/model.json" --md "$dir/model.md"
if command -v ncu >/dev/null; then  # (--clock-control none: leave the GPU's clocks as they are)
  # The report itself (tens of MB) stays out of the tarball, a lease returns at most 16 MB a file:
  # its sections for every profiled kernel, then the gate's per-line counters (warp stall
  # samples) by kernels/triton_sae_gate.py line, come back as text.
  step profile 40 ncu --profile-from-start off --clock-control none --section SpeedOfLight --section LaunchStats \
    --section Occupancy --section WarpStateStats --section SourceCounters --export /tmp/profile --force-overwrite \
    python -m headsteer.bench.kernels --profile
  step profile_details 10 ncu --import /tmp/profile.ncu-rep --page details
  step profile_source 10 ncu --import /tmp/profile.ncu-rep --page source --csv --print-source cuda,sass \
    --kernel-name regex:sae_steer_gate --launch-count 1
  # The same for the QKV and output projections at ViT-B, usage 1 (their 5th and 6th launches in
  # `launch_cases()`' order: ViT-S usage 1 and 0.33 come first), the gap to cuBLAS.
  step profile_source_projections 10 ncu --import /tmp/profile.ncu-rep --page source --csv --print-source cuda,sass \
    --kernel-name regex:"_qkv_kernel|_proj_kernel" --launch-skip 4 --launch-count 2
fi
if [ "$quick" != "--quick" ]; then
  step sweep 40 python -m headsteer.bench.kernels --sweep
  step gate_sweep 30 python -m headsteer.bench.kernels --gate-sweep
fi
step tests_variants 45 "${tests[@]}" -k "$variants"
exit "$status"
