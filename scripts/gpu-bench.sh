#!/usr/bin/env bash
# The whole GPU benchmark suite in one go, for a lent GPU machine whose image brings its own
# CUDA torch: installs the project without touching torch, checks CUDA, runs the kernel
# benchmark on every StarCoder shape, and writes results under $OUT (or docs/benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-docs/benchmarks}"
python3 -m pip install --quiet --no-deps -e .
python3 -m pip install --quiet "pydantic>=2,<3" matplotlib tqdm
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m flora.cli bench kernels --device cuda --shapes 1b 3b 15b --tokens 64 2048 \
  --adapters 1 8 32 T --ranks 1 2 4 8 16 32 64 --dtypes bf16 fp16 --out "$OUT_DIR"
