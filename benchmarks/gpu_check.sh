#!/usr/bin/env bash
# The GPU checks of issue 13, on a machine with a CUDA GPU (about 8 minutes on one H100-class card):
# 1. the `gpu` tests (train bf16/fp16/tf32/auto with --eval-metrics, gradient checkpointing,
#    load -> cuda, caption/eval on cuda, torchrun 1-proc NCCL), about 2-4 minutes;
# 2. the throughput table (benchmarks/gpu_throughput.py): samples/s, MFU against the bf16 matmul peak
#    measured in the same run, peak memory, for SmolLM2-135M- and Qwen2.5-0.5B-sized decoders on
#    SigLIP-base-sized cached features, next to the two upstream architectures; it stops starting
#    runs after GPU_THROUGHPUT_BUDGET_S seconds (default 300).
# Run from the repository root:  bash benchmarks/gpu_check.sh      (figures: benchmarks/gpu-throughput.jsonl)
#
#   bash benchmarks/gpu_check.sh --smoke [--json PATH]
# checks the plumbing on any machine, GPU or not, in seconds: the Python it finds and
# gpu_throughput.py --smoke (tiny models on the CPU) writing its JSON lines to PATH; it fails if
# that fails. (The `gpu` tests themselves are collected, and skipped without a GPU, by `make test`.)
# Not run on a GPU yet: written on a CPU-only machine (checked with --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
smoke=0
json=benchmarks/gpu-throughput.jsonl
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --json) json="${2:?--json needs a path}"; shift ;;
        *) echo "gpu_check.sh: unknown option $1 (use --smoke, --json PATH)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$smoke" = 1 ]; then
    echo "gpu_check.sh --smoke: $("$PYTHON" --version 2>&1) at $PYTHON; no GPU needed"
    exec "$PYTHON" benchmarks/gpu_throughput.py --smoke --json "$json"
fi

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU (bash benchmarks/gpu_check.sh --smoke checks it on a CPU)"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}; torch {torch.__version__}")
PY
status=0
VLMKIT_HOME="$(mktemp -d)" "$PYTHON" -m pytest -m gpu -q -rs tests/gpu || status=$?
VLMKIT_HOME="$(mktemp -d)" "$PYTHON" benchmarks/gpu_throughput.py \
  --budget-s "${GPU_THROUGHPUT_BUDGET_S:-300}" --json "$json" || status=$?
exit $status
