#!/usr/bin/env bash
# The PMP train-step benchmark on one GPU: our jitted step against the transformers + torch AdamW
# peer at qwen2_0_5b and qwen2_1_5b, bf16, 1024 tokens, synthetic data, within 8 minutes.
#
#   launch/gpu_benchmark.sh [train_step.py flags, e.g. --pairs=8 or --model attention=fused]
#
# Writes the table and ratio lines to $OUT (default: gpu_benchmark_<host>_<UTC time>.txt in the
# repository root) and prints them. Set PYTHON to pick the interpreter, SHAPES to change the shapes;
# DRY_RUN=1 checks the imports and flags and prints what would be measured, on any machine.
#
# The machine needs JAX with CUDA, PyTorch and transformers; it needs neither TensorFlow nor
# network. Python packages the benchmark imports beyond those are installed, only when missing,
# from wheels in launch/.whl/ with `pip install --no-index --no-deps`. Fetch them on any machine
# with network, for the GPU machine's Python version (3.11 here; `python3 -V` there):
#   pip download --no-deps --only-binary=:all: --python-version 3.11 \
#     --platform manylinux2014_x86_64 -d launch/.whl \
#     absl-py==2.5.0 ml-collections==1.1.0 flax==0.12.8 optax==0.2.8 tensorboardX==2.6.5 \
#     msgpack==1.2.4 etils==1.15.0 protobuf==7.36.2 treescope rich PyYAML
# and copy launch/.whl/ along with the checkout (git ignores it).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=launch/.whl
SHAPES=${SHAPES:-qwen2_0_5b qwen2_1_5b}
OUT=${OUT:-gpu_benchmark_$(hostname -s)_$(date -u +%Y%m%dT%H%M%SZ).txt}
PER_SHAPE_SECONDS=${PER_SHAPE_SECONDS:-220}  # two shapes plus installs stay under 8 minutes
export TF_CPP_MIN_LOG_LEVEL=2

# Installs the distribution that provides each module the benchmark fails to import, one at a time.
declare -A DIST=([absl]=absl-py [ml_collections]=ml-collections [google]=protobuf [yaml]=PyYAML)
for _ in $(seq 12); do
  missing=$("$PYTHON" -c "
try:
  import benchmarks.train_step
except ModuleNotFoundError as e:
  print(e.name.split('.')[0])" 2>/dev/null) || { echo "cannot import benchmarks.train_step" >&2; exit 1; }
  [[ -z "$missing" ]] && break
  dist=${DIST[$missing]:-$missing}
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "module $missing is missing and $WHEELS/ holds no wheels; see the header of $0" >&2
    exit 1
  fi
  echo "installing $dist from $WHEELS/ (module $missing is missing)"
  "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$dist"
done

FLAGS=(--dtype=bfloat16 --seq_len=1024 --steps=5 --warmup=2)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for shape in $SHAPES; do
    "$PYTHON" -m benchmarks.train_step --shapes="$shape" "${FLAGS[@]}" --dry_run "$@"
  done
  exit 0
fi
"$PYTHON" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()" \
  || { echo "JAX sees no GPU: install jax[cuda12] (or cuda13)" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

: > "$OUT"
for shape in $SHAPES; do
  # One process per shape, each with its own time limit, so one slow shape cannot take the table.
  if ! timeout "$PER_SHAPE_SECONDS" "$PYTHON" -m benchmarks.train_step --shapes="$shape" \
      "${FLAGS[@]}" --out="$OUT.$shape" "$@"; then
    echo "$shape: failed or ran past ${PER_SHAPE_SECONDS}s" | tee "$OUT.$shape"
  fi
  cat "$OUT.$shape" >> "$OUT"
  rm -f "$OUT.$shape"
done
echo "table written to $OUT"
