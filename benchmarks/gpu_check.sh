#!/usr/bin/env bash
# The GPU checks of issue 13, on a machine with a CUDA GPU: the `gpu` tests (train bf16/fp16/tf32/auto
# with --eval-metrics, gradient checkpointing, load -> cuda, caption/eval on cuda, torchrun 1-proc NCCL).
# Run from the repository root:  bash benchmarks/gpu_check.sh   (about 2-4 minutes on one GPU)
# Not run yet: written on a CPU-only machine. The throughput table of issue 13 is not part of it yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}; torch {torch.__version__}")
PY
VLMKIT_HOME="$(mktemp -d)" "$PYTHON" -m pytest -m gpu -q -rs tests/gpu
