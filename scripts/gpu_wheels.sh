#!/usr/bin/env bash
# Wheels a GPU machine without network needs beyond its image (the workplace's H200 image has torch, triton,
# accelerate, safetensors, tokenizers; not transformers 5.23, hqq or termcolor), saved to .whl/ (git-ignored
# through .git/info/exclude). There: pip install --no-index --no-deps --no-build-isolation --target /tmp/site
# .whl/*.whl . (one call: a second --target install skips the bin/ that holds offload-bench), then
# PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH TRITON_INTERPRET=0 scripts/gpu_check.sh OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl transformers==5.23.0 termcolor
# hqq publishes an sdist only: build its wheel here without CUDA extensions (our kernels are our own)
DISABLE_CUDA=1 python3 -m pip wheel --quiet --no-deps -w .whl hqq==0.2.8.post1
ls .whl
