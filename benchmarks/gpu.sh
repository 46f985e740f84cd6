#!/usr/bin/env bash
# The step benchmark on a GPU, as one prepared run (a few minutes): ours
# against optax on large leaves, plain and low-memory state, with each step's bandwidth as a fraction of an elementwise kernel
# moving the same bytes on the same device ("of ceiling"), and the device's
# name in the results. Writes benchmarks/results/gpu/step.{json,md,png}.
#   bash benchmarks/gpu.sh            (after: pip install -e ".[bench]" and a
#                                      CUDA jax, e.g. pip install "jax[cuda12]")
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PYTHON -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
$PYTHON -m benchmarks --suites step --no-torch \
  --trees "1 x 16M,256 x 64K" \
  --variants "plain,centered+momentum,bf16 nu,bf16 nu (SR),8-bit nu" \
  --dtypes float32 --out benchmarks/results/gpu "$@"
