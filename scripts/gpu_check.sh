#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go: the CUDA tests, the Triton kernel tests compiled for the real
# GPU (not the interpreter), and the GPU benchmarks. Usage: scripts/gpu_check.sh [OUTDIR] [SECTION...]
# Sections: tests kernels speculative e2e split (default: all). Logs and JSON go to OUTDIR (default gpu-results).
# On a machine without network whose image lacks some dependencies: scripts/gpu_wheels.sh here first.
set -uo pipefail
out=${1:-gpu-results}; shift || true
sections=${*:-tests kernels speculative e2e split}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1  # tests/conftest.py would otherwise pick the interpreter
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
rc=0
for s in $sections; do
  echo "=== $s"
  case $s in
    tests) python -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py tests/test_kernels_triton.py \
             tests/test_moe_dispatch.py tests/test_predictor.py tests/test_speculative.py tests/test_split.py ;;
    kernels) offload-bench gpu-kernels --json "$out/gpu-kernels.json" ;;
    speculative) offload-bench speculative --device cuda --prompts 10 --runs 3 --json "$out/speculative.json" ;;
    e2e) offload-bench e2e --device cuda --rounds ${E2E_ROUNDS:-3} --json "$out/e2e.json" \
           --contenders ours-resident-bf16,ours-resident-bf16-eager,transformers,ours-offloaded-bf16,ours-offloaded-bf16-eager,ours-resident-a4e2 ;;
    split) offload-bench split --device cuda --runs 3 --json "$out/split.json" ;;
    *) echo "unknown section $s" >&2; false ;;
  esac 2>&1 | tee "$out/$s.log"
  status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || { echo "section $s failed: rc $status"; rc=1; }
done
exit $rc
