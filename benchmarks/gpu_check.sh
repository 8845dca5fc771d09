#!/usr/bin/env bash
# The GPU check, made to run on the lent GPU machine as it is: an image with Python 3.12, torch,
# transformers, accelerate, peft, timm, typer, rich, onnx, onnxruntime and pytest, but no pydantic
# or gguf, and no registry to fetch them from. They travel as wheels: on a machine with a registry,
#     make gpu-wheels                        # -> .whl/ (about 10 MB: pydantic and friends, gguf, vlmkit)
# then on the GPU machine, from the repository root (with .whl/ carried along):
#     bash benchmarks/gpu_check.sh           # about 8 minutes at most
#     bash benchmarks/gpu_check.sh --dry-run # anywhere: installs, imports vlmkit, lists what it would run
#     bash benchmarks/gpu_check.sh --smoke [--json PATH]  # any machine, seconds: gpu_throughput.py
#         --smoke (tiny models on the CPU) through this script; tests/benchmarks/test_smoke.py runs it
#
# 1. installs .whl/*.whl with --no-index --no-deps into a scratch folder (vlmkit's own wheel gives
#    the built-in plugins' entry points; the code imported is this checkout's, first on the path);
# 2. prints the versions it runs with and the GPU;
# 3. runs the `gpu` tests (tests/gpu: training in bf16/fp16/tf32/auto with --eval-metrics, gradient
#    checkpointing, load/caption/eval on cuda, torchrun with one NCCL process);
# 4. runs the throughput table (benchmarks/gpu_throughput.py) in the time left.
# Everything under one overall timeout (GPU_CHECK_BUDGET_S, default 480 s). Results are appended as
# they come, one JSON line per test and per throughput row, to GPU_CHECK_OUT (default
# benchmarks/results/gpu-check.jsonl): a crash or a timeout loses nothing already measured.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
SMOKE=0
SMOKE_JSON=benchmarks/gpu-throughput.jsonl
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --smoke) SMOKE=1 ;;
    --json) SMOKE_JSON="${2:?--json needs a path}"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (use --dry-run, or --smoke [--json PATH])" >&2; exit 2 ;;
  esac
  shift
done

if [ "$SMOKE" = 1 ]; then
  PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
  echo "gpu_check.sh --smoke: $("$PYTHON" --version 2>&1) at $PYTHON; no GPU needed"
  exec "$PYTHON" benchmarks/gpu_throughput.py --smoke --json "$SMOKE_JSON"
fi

PYTHON="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu-check.jsonl}"
WHEELS=(.whl/*.whl)
START=$SECONDS

if [ ! -e "${WHEELS[0]}" ]; then
  echo "gpu_check.sh: no wheels in .whl/: run 'make gpu-wheels' on a machine with a registry first" >&2
  exit 2
fi
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/vlmkit-gpu-check.XXXXXX")"
PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$SCRATCH/site")
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$PY_VERSION" = 3.12 ]; then
  "${PIP[@]}" "${WHEELS[@]}"
  # this checkout first (its code), then the wheels (pydantic, gguf, vlmkit's entry points)
  export PYTHONPATH="$PWD:$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$DRY_RUN" = 1 ]; then
  # not the image's Python: install the wheels as for it (checks they fit CPython 3.12 on
  # manylinux x86-64), but import vlmkit with this Python's own packages
  "${PIP[@]}" --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 "${WHEELS[@]}"
  echo "python $PY_VERSION: the wheels installed for CPython 3.12 into $SCRATCH/site (not imported here)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check.sh: the wheels in .whl/ are for Python 3.12 (the GPU image's); this is $PY_VERSION" >&2
  exit 2
fi
mkdir -p "$SCRATCH/plugin"
export PYTHONPATH="$PYTHONPATH:$SCRATCH/plugin"
export VLMKIT_HOME="$SCRATCH/home"
mkdir -p "$(dirname "$OUT")"

# one JSON line per test as it finishes (a pytest plugin from this script, not from the repository)
cat > "$SCRATCH/plugin/vlmkit_gpu_check_jsonl.py" <<'PY'
import json, os, time

def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        with open(os.environ["GPU_CHECK_OUT"], "a") as fh:
            fh.write(json.dumps({"kind": "test", "test": report.nodeid, "phase": report.when,
                                 "outcome": report.outcome, "seconds": round(report.duration, 2),
                                 "time": time.time()}) + "\n")
PY
export GPU_CHECK_OUT="$OUT"

"$PYTHON" - <<'PY'
import json, os, platform, sys, importlib.metadata as md
import torch
versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
for name in ("transformers", "accelerate", "peft", "timm", "pydantic", "pydantic-core", "gguf", "onnxruntime",
             "onnxruntime-gpu", "pytest", "vlmkit"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
import vlmkit  # this checkout's, with the wheels' pydantic
versions["vlmkit_from"] = os.path.dirname(vlmkit.__file__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    versions["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
else:
    versions["gpu"] = None
print("\n".join(f"{k}: {v}" for k, v in versions.items()), flush=True)
with open(os.environ["GPU_CHECK_OUT"], "a") as fh:
    fh.write(json.dumps({"kind": "versions", **versions}) + "\n")
PY

TESTS=(tests/gpu)
THROUGHPUT=("$PYTHON" benchmarks/gpu_throughput.py)
if [ "$DRY_RUN" = 1 ]; then
  "$PYTHON" -m vlmkit.cli.main plugins list >/dev/null
  echo "would run (overall budget ${BUDGET_S} s, results in $OUT):"
  "$PYTHON" -m pytest -p vlmkit_gpu_check_jsonl --collect-only -q -m gpu "${TESTS[@]}" | grep '::'
  echo "then: ${THROUGHPUT[*]} --budget-s <the time left>"
  rm -rf "$SCRATCH"
  exit 0
fi

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh needs a CUDA GPU (or --dry-run)")'
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
status=0
# the tests get at most 60% of the budget; the table what is left (it starts no run past --budget-s)
timeout --kill-after=10 $(( $(left) * 6 / 10 )) "$PYTHON" -m pytest -p vlmkit_gpu_check_jsonl -m gpu -q -rs \
  "${TESTS[@]}" || status=$?
remaining=$(left)
if [ "$remaining" -gt 30 ]; then
  # gpu_throughput.py prints every row as a JSON line as it is measured: kept as it comes
  set +o pipefail
  timeout --kill-after=10 "$remaining" "${THROUGHPUT[@]}" --budget-s $(( remaining - 30 )) 2>&1 \
    | tee "$SCRATCH/throughput.log" \
    | while IFS= read -r line; do
        echo "$line"
        case "$line" in "  {"*) echo "{\"kind\": \"throughput\", \"row\": ${line#  }}" >> "$OUT" ;; esac
      done
  rc=${PIPESTATUS[0]}
  set -o pipefail
  [ "$rc" = 0 ] || status=$rc
else
  echo "{\"kind\": \"throughput\", \"skipped\": \"no time left ($remaining s)\"}" >> "$OUT"
fi
echo "{\"kind\": \"done\", \"status\": $status, \"seconds\": $(( SECONDS - START ))}" >> "$OUT"
rm -rf "$SCRATCH"
exit $status
