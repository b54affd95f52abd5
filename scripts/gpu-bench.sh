#!/usr/bin/env bash
# The whole GPU suite in one go, for a lent GPU machine whose image brings its own CUDA torch
# (and transformers, peft, safetensors, tokenizers): the engine tests on CUDA, the kernel
# benchmark on StarCoder c_attn shapes, and the engine benchmark on StarCoderBase-1B and
# StarCoder-15B configs (random weights). Results go under $OUT (or docs/benchmarks).
#
# Packages the image lacks (pydantic and its deps) travel as wheels in .whl/ (see
# docs/benchmarks/README.md); nothing is fetched on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-docs/benchmarks}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/platform:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLORA_CACHE_DIR="${FLORA_CACHE_DIR:-/tmp/flora-cache}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1

if [ "${1:-}" != "--engine-only" ]; then
# 1. correctness on CUDA: the engine tests, same assertions as on CPU
FLORA_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/engine 2>&1 \
  | tee "$OUT_DIR/engine-tests-cuda.log" | tail -5

# 2. layer-level paths on StarCoder c_attn shapes (paper Fig. 2, left)
timeout 110 python3 -m flora.cli bench kernels --device cuda --shapes 1b 15b --tokens 64 2048 \
  --adapters 32 T --ranks 1 4 16 64 --dtypes bf16 --rounds 5 --out "$OUT_DIR" | tail -30
fi

# 3. end to end (paper Fig. 2): 64 concurrent requests, each on its own adapter; one untimed
#    warm-up round first (cuBLAS picks kernels per shape on first use)
timeout 200 python3 -m flora.cli bench engine --device cuda --preset starcoderbase-1b \
  --ranks 1 4 16 --rounds 3 --warmup 1 --only "same flora r1" "flora r1" "flora r4" "flora r16" \
  ia3 "lora gather r1" "lora gather r4" "lora gather r16" "lora bmm r1" "lora bmm r4" \
  "lora bmm r16" "transformers generate" --out "$OUT_DIR" | tail -25
timeout 110 python3 -m flora.cli bench engine --device cuda --preset starcoder-15b \
  --ranks 1 --rounds 2 --warmup 1 --no-baselines --only "flora r1" "lora gather r1" \
  "lora bmm r1" --out "$OUT_DIR" | tail -12
