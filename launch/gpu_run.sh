#!/usr/bin/env bash
# The one script of the GPU session (issue 19): the reproduction on the real SmolLM2-135M backbone
# (launch/experiments/gpu_reproduction.py) and the performance table (launch/gpu_benchmark.sh), in
# two device calls on one H200, made back to back so the machine stays warm (30 s) between them.
#
#   launch/gpu_run.sh stage      # HERE (network, pip): wheels into .whl/, the travelling files
#                                # into .gpu/ (~55 MiB) and .gpu.part2/ (~47 MiB); prints sizes
#   launch/gpu_run.sh rehearse   # HERE: call1 and call2 themselves at a tiny size on CPU (a tiny
#                                # GGUF, the GPU-absent modules hidden, the benchmark's DRY_RUN)
#   launch/gpu_run.sh call1      # THERE, device call 1: run(carry=[".whl", ".gpu"], timeout_s=420)
#   launch/gpu_run.sh call2      # THERE, device call 2 AT ONCE: run(carry=[".gpu.part2"], timeout_s=540)
#
# Device time, 15 min in all (start and transfers included):
#   call 1  ~1.5 min start + ~6 min: wheels (5 s); code pairs synthesized from the stdlib and the
#           machine's site-packages (mutate, 14 cores) and tokenized, IN THE BACKGROUND while the
#           benchmark runs on the GPU (2 shapes x plain/fused attention, ours and the PyTorch peer,
#           then generation; each process time-limited). Returns the benchmark table and a log.
#   call 2  ~7.5 min: the GGUF joined from its parts (sha256 checked) and converted (float32
#           masters), PMP on the code pairs (~3.5 min at the default 80k pairs x 512 tokens,
#           batch 64), RM fine-tuning of base and PMP at k=256 and 2048, 2 seeds each (8 RMs),
#           every RM evaluated on all 1,319 GSM8K pairs, all 1,572 LogiQA 2.0 questions and CHAMP
#           Best-of-8. Returns results.md/.json/.png and a log (never checkpoints).
# If call 2 finds the machine cold (call 1's files gone) it stops at once, saying so: then run
# call1 again with REPRO_ONLY=1 (no benchmark), and call2 right after it.
# Sizes: GPU_REPRO_FLAGS (e.g. "--code_pairs=60000 --seeds=0,1,2"), BENCH_SECONDS (per process).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FILES=${FILES:-.gpu}  # what `stage` wrote (and $FILES.part2)
RUNS=${RUNS:-runs/gpu_reproduction}
RESULTS=${OUT:-gpu_results}  # the device tool's $OUT there; a folder here
SITE=${SITE:-/tmp/site}  # the wheels' install target; survives between calls while warm
read -r -a REPRO_FLAGS <<< "${GPU_REPRO_FLAGS:-}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if [[ "${CPU_REHEARSAL:-0}" == 1 ]]; then  # set by `rehearse`: the same calls, tiny, on CPU
  REPRO_FLAGS+=(--cpu_rehearsal --rehearsal_source=codepmp_jax/synth)
fi

install_wheels() {
  # The packages the GPU machine lacks (KINDS.md), from the carried wheels.
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    [[ "${CPU_REHEARSAL:-0}" == 1 ]] || { echo ".whl/ holds no wheels: run $0 stage here" >&2; exit 1; }
    echo "no .whl/ (run $0 stage): the rehearsal uses this machine's packages" >&2
    return
  fi
  if [[ ! -f "$SITE/.installed" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl
    touch "$SITE/.installed"
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
}

repro() {
  "$PYTHON" -m launch.experiments.gpu_reproduction --out="$RUNS" --files="$FILES" "${REPRO_FLAGS[@]}" "$@"
}

case "${1:-}" in
  stage)
    mkdir -p .whl
    mapfile -t WHEELS < <("$PYTHON" -c "
from launch.experiments.gpu_reproduction import WHEELS; print('\n'.join(WHEELS))")
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    "$PYTHON" -m launch.experiments.gpu_reproduction --stage_files=.gpu "${REPRO_FLAGS[@]}"
    du -sh .whl .gpu .gpu.part2
    ;;
  rehearse)
    # call1 and call2 as they run there, at a tiny size: a tiny random Llama GGUF staged like the
    # real one, the modules the GPU machine lacks hidden, the benchmark's DRY_RUN.
    root=${REHEARSAL_DIR:-/tmp/gpu_run_rehearsal}
    rm -rf "$root" && mkdir -p "$root"
    "$PYTHON" -c "import sys; from tests.test_gpu_scripts import tiny_gguf; tiny_gguf(sys.argv[1])" \
      "$root/tiny.gguf"
    "$PYTHON" -m launch.experiments.gpu_reproduction --cpu_rehearsal --stage_files="$root/files" \
      --gguf="$root/tiny.gguf"
    export CPU_REHEARSAL=1 FILES=$root/files RUNS=$root/runs OUT=$root/results SITE=$root/site
    "$0" call1
    "$0" call2
    ls -l "$OUT"
    ;;
  call1)
    install_wheels
    mkdir -p "$RESULTS"
    if [[ "${CPU_REHEARSAL:-0}" != 1 ]]; then
      "$PYTHON" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()"
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    repro --stages=pairs,prepare > "$RESULTS/call1_pairs.log" 2>&1 &
    pairs=$!
    if [[ "${CPU_REHEARSAL:-0}" == 1 ]]; then
      SHAPES=qwen2_0_5b DRY_RUN=1 launch/gpu_benchmark.sh 2>&1 | tee "$RESULTS/call1_benchmark.log"
    elif [[ "${REPRO_ONLY:-0}" != 1 ]]; then
      OUT="$RESULTS/gpu_benchmark.txt" launch/gpu_benchmark.sh 2>&1 | tee "$RESULTS/call1_benchmark.log"
    fi
    wait "$pairs" || { tail -30 "$RESULTS/call1_pairs.log"; exit 1; }
    tail -5 "$RESULTS/call1_pairs.log"
    ;;
  call2)
    [[ -f "$FILES/gguf.part1" && -d "$RUNS/prepared_pairs" ]] || {
      echo "call 1's files are gone (the machine went cold): run call1 with REPRO_ONLY=1, then call2" >&2
      exit 3; }
    install_wheels
    mkdir -p "$RESULTS"
    repro --stages=backbone,pretrain,rm 2>&1 | tee "$RESULTS/call2.log"
    cp "$RUNS"/results.md "$RUNS"/results.json "$RUNS"/results.png "$RESULTS"/
    gen=(env PARTS=generate GGUF="$(ls "$RUNS"/gguf/*.gguf)" PROMPTS="$FILES/data/gsm8k/test.jsonl")
    if [[ "${CPU_REHEARSAL:-0}" == 1 ]]; then
      "${gen[@]}" DRY_RUN=1 launch/gpu_benchmark.sh
    elif [[ "${REPRO_ONLY:-0}" != 1 ]]; then
      "${gen[@]}" OUT="$RESULTS/gpu_benchmark_generate.txt" launch/gpu_benchmark.sh
    fi
    ;;
  *)
    sed -n '2,26p' "$0"
    exit 2
    ;;
esac
