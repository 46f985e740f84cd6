#!/usr/bin/env bash
# The step benchmark on a GPU, as one prepared run (about 10 minutes):
# ours against optax on large and many-leaf trees, plain and low-memory
# state, with each step's bandwidth as a fraction of an elementwise kernel
# moving the same bytes on the same device ("of ceiling"), and the device's
# name in the results. Writes benchmarks/results/gpu/step.{json,md,png}.
#   bash benchmarks/gpu.sh            (after: pip install -e ".[bench]" and a
#                                      CUDA jax, e.g. pip install "jax[cuda12]")
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
python -m benchmarks --suites step \
  --trees "1 x 16M,256 x 64K,1000 x 1K,transformer" \
  --variants "plain,centered+momentum,bf16 nu,bf16 nu (SR),8-bit nu" \
  --dtypes float32 --out benchmarks/results/gpu "$@"
