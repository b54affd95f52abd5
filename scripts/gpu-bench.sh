#!/usr/bin/env bash
# The whole GPU suite in one go (~9 minutes at most), for a lent GPU machine whose image brings
# its own CUDA torch (and transformers, peft, safetensors, tokenizers, triton): the engine tests
# on CUDA (eager and compiled), the Triton kernels compiled, the operators and host time per
# step, the kernel benchmark on StarCoder c_attn shapes, and the engine benchmark on
# StarCoderBase-1B and StarCoder-15B configs (random weights). Every step keeps its full log.
# Results go under $OUT (or docs/benchmarks); docs/benchmarks/gpu-bench.md says what each file
# holds and which issue-15 target each row checks.
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
# 1. correctness on CUDA: the engine tests, same assertions as on CPU; then the compiled engine
#    and the Triton kernels (compiled, not interpreted) against the same references
FLORA_TEST_DEVICE=cuda timeout 90 python3 -m pytest -v -p no:cacheprovider tests/engine 2>&1 \
  | tee "$OUT_DIR/engine-tests-cuda.log" | tail -5
FLORA_TEST_DEVICE=cuda FLORA_TEST_COMPILE=default timeout 60 python3 -m pytest -v \
  -p no:cacheprovider tests/engine/test_compile.py tests/engine/test_batching.py 2>&1 \
  | tee "$OUT_DIR/engine-tests-cuda-compiled.log" | tail -3
FLORA_TEST_DEVICE=cuda timeout 60 python3 -m pytest -v -p no:cacheprovider \
  tests/adapters/test_triton_kernels.py 2>&1 | tee "$OUT_DIR/triton-tests-cuda.log" | tail -3

# 2. what the host issues per step, and the step's wall time on a micro model (host-bound)
timeout 45 python3 scripts/step_ops.py --device cuda --decode-steps 30 --out "$OUT_DIR" \
  --label cuda 2>&1 | tee "$OUT_DIR/step-ops-cuda.log" | tail -8

# 3. layer-level paths on StarCoder c_attn shapes (paper Fig. 2, left), Triton paths included
timeout 100 python3 -m flora.cli bench kernels --device cuda --shapes 1b 15b --tokens 64 2048 \
  --adapters 32 T --ranks 1 4 16 64 --dtypes bf16 --rounds 5 --out "$OUT_DIR" 2>&1 \
  | tee "$OUT_DIR/kernels-cuda.log" | tail -30
fi

# 4. end to end (paper Fig. 2): 64 concurrent requests, each on its own adapter; one untimed
#    warm-up round first (cuBLAS picks kernels per shape on first use)
timeout 170 python3 -m flora.cli bench engine --device cuda --preset starcoderbase-1b \
  --ranks 1 4 16 --rounds 3 --warmup 1 --compile default --only "same flora r1" "flora r1" \
  "flora r4" "flora r16" ia3 "lora gather r1" "lora gather r16" "lora bmm r1" "lora bmm r16" \
  "no adapters (compiled)" "flora r1 (compiled)" "transformers generate" --out "$OUT_DIR" 2>&1 \
  | tee "$OUT_DIR/engine-cuda-1b.log" | tail -25
timeout 100 python3 -m flora.cli bench engine --device cuda --preset starcoder-15b \
  --ranks 1 --rounds 2 --warmup 1 --no-baselines --only "flora r1" "lora gather r1" \
  "lora bmm r1" --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/engine-cuda-15b.log" | tail -12
