#!/usr/bin/env bash
# The one script of the GPU session (issue 19): the reproduction on the real SmolLM2-135M backbone
# (launch/experiments/gpu_reproduction.py) and the performance table (launch/gpu_benchmark.sh), in
# two device calls on one H200, made back to back so the machine stays warm (30 s) between them.
#
#   launch/gpu_run.sh stage      # HERE (network, pip): wheels into .whl/ (11 MiB since the data
#                                # format needs Grain and TFDS), the travelling files into .gpu/
#                                # (57 MiB) and .gpu.part2/ (47 MiB); with the working tree
#                                # (1.5 MiB) call 1 would carry ~70 of 64 MiB: move ~6 MiB of .gpu
#                                # into .gpu.part2 before the next GPU session (not done yet)
#   launch/gpu_run.sh rehearse   # HERE: call1 and call2 themselves at a tiny size on CPU (a tiny
#                                # GGUF, the GPU-absent modules hidden, the benchmark's DRY_RUN)
#   launch/gpu_run.sh call1      # THERE, device call 1: run(carry=[".whl", ".gpu"], timeout_s=330)
#   launch/gpu_run.sh call2      # THERE, device call 2 AT ONCE: run(carry=[".gpu.part2"], timeout_s=480)
#
# Device time, 15 min (900 s) in all, starts and transfers included; planned ~810 s, at most 900:
#   start   ~90 s (a cold machine).
#   call 1  ~290 s (limit 330): wheels (5 s); code pairs synthesized from the stdlib and big
#           packages of the machine's site-packages (mutate, 14 cores) and tokenized, IN THE
#           BACKGROUND while the train-step benchmark runs on the GPU (2 shapes x blocked/cudnn
#           attention: per shape one process of the PyTorch peer, ours padded and ours packed
#           with blocked attention, at most FIRST_SECONDS=100 s, and one of ours with cudnn
#           attention, at most RUN_SECONDS=55 s). Returns gpu_benchmark.txt and two logs.
#   call 2  ~430 s (limit 480), within 30 s of call 1's end: the GGUF joined from its parts
#           (sha256 checked) and converted (float32 masters, 20 s); PMP, one epoch over up to 60k
#           pairs x 512 tokens at batch 64 (~940 steps, ~200 s: an estimate at ~40% MFU, not a
#           reading); RM fine-tuning of base and PMP at k=256 and 2048, 2 seeds each (8 RMs), each
#           evaluated on all 1,319 GSM8K pairs, all 1,572 LogiQA 2.0 questions and CHAMP Best-of-8
#           (~180 s); the generation benchmark (~40 s). Returns results.md/.json/.png,
#           gpu_benchmark_generate.txt and a log (never checkpoints); results.json also holds
#           each RM's ties, tie-aware accuracies and truncation, and the CHAMP style baselines.
# If call 2 finds the machine cold (call 1's files gone) it stops at once, saying so: then run
# call1 again with REPRO_ONLY=1 (no benchmark), and call2 right after it.
# Sizes: GPU_REPRO_FLAGS (e.g. "--code_pairs=40000 --seeds=0,1,2 --pretrain_epochs=0.5"), and
# gpu_benchmark.sh's FIRST_SECONDS, RUN_SECONDS, GEN_SECONDS, SHAPES, ATTENTIONS.
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
from launch.experiments.gpu_reproduction import WHEELS, SDIST_ONLY
print('\n'.join(w for w in WHEELS if w not in SDIST_ONLY))")
    mapfile -t SDISTS < <("$PYTHON" -c "
from launch.experiments.gpu_reproduction import SDIST_ONLY; print('\n'.join(SDIST_ONLY))")
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    "$PYTHON" -m pip wheel -q --no-deps -w .whl "${SDISTS[@]}"  # pure Python: any interpreter
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
    sed -n '2,30p' "$0"
    exit 2
    ;;
esac
