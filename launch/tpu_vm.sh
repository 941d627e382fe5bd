#!/usr/bin/env bash
# Cloud TPU VM launcher for codepmp_jax.train; --help prints its usage.
set -euo pipefail

usage() {
  cat <<'EOF'
Creates a TPU VM, installs this checkout on every worker, runs codepmp_jax.train on all workers
(jax.distributed.initialize detects the TPU hosts by itself), streams worker 0's log, and deletes
the VM at the end, also after a failure or Ctrl-C (unless --keep).

Usage (from anywhere; the checkout is the one holding this script):
  launch/tpu_vm.sh --type=v4-32 --zone=us-central2-b --version=tpu-ubuntu2204-base
      [--name=NAME] [--project=P] [--spot] [--keep] [--fetch=LOCAL_DIR] [--python=python3]
      [--jax='jax[tpu]==0.10.2'] [--setup=CMD] [--bucket=gs://BUCKET] [--dry-run]
      -- --config=configs/x.py [--workdir=DIR] [--config.a.b=v ...]

  --type       accelerator type (v4-8, v4-32, v5litepod-16, v6e-8, ...)
  --zone       zone that has that type
  --version    TPU software (runtime) version; jax 0.10 needs Python >= 3.11 on it (else see --setup)
  --name       VM name (default: codepmp-<user>-<time>)
  --project    Google Cloud project (default: gcloud's configured one)
  --spot       create a Spot VM (preemptible; the trainer saves on SIGTERM and resumes from the workdir)
  --keep       do not delete the VM at the end
  --fetch      copy the workdir from worker 0 into LOCAL_DIR before deleting (for a workdir on the
               VM's disk; a multi-host run needs a workdir that all workers share)
  --python     the workers' Python
  --jax        the jax requirement installed for TPUs
  --setup      a command run on every worker in the checkout before the install, e.g. to copy the
               prepared data (--setup='gcloud storage cp -r gs://BUCKET/prepared .') or to install
               a newer Python (then pass --python=python3.11)
  --bucket     a GCS bucket (or $CODEPMP_BUCKET): without --workdir the run writes to
               gs://BUCKET/runs/NAME, which every worker shares and a restarted VM resumes from
  --dry-run    print the commands instead of running them

A pod (more than one host: v4-16 and up, v5litepod-16 and up, ...) needs a workdir that every
worker sees: gs://... (the default with --bucket) or a shared filesystem. The trainer checks
this at start and stops, naming the workdir, if a worker cannot see it.
EOF
}

# quote_word and print_command (shell-safe command lines) live with the launchers' shared logic.
# shellcheck source=launch/distributed_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/distributed_env.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Paths expanded by the workers' shell.
# shellcheck disable=SC2016
REMOTE_DIR='$HOME/codepmp_jax'
# shellcheck disable=SC2016
LOG='$HOME/codepmp_train.log'
# shellcheck disable=SC2016
STATUS='$HOME/codepmp_train.rc'

main() {
  local type="" zone="" version="" project=""
  NAME="codepmp-${USER:-user}-$(date +%m%d-%H%M%S)"
  local spot=0 keep=0 fetch="" python=python3 jax_spec='jax[tpu]==0.10.2' setup=
  local bucket=${CODEPMP_BUCKET:-}
  DRY_RUN=0
  while (($#)); do
    case $1 in
      --type=*) type=${1#*=} ;;
      --zone=*) zone=${1#*=} ;;
      --version=*) version=${1#*=} ;;
      --name=*) NAME=${1#*=} ;;
      --project=*) project=${1#*=} ;;
      --spot) spot=1 ;;
      --keep) keep=1 ;;
      --fetch=*) fetch=${1#*=} ;;
      --python=*) python=${1#*=} ;;
      --jax=*) jax_spec=${1#*=} ;;
      --setup=*) setup=${1#*=} ;;
      --bucket=*) bucket=${1#*=} ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) echo "tpu_vm.sh: unknown option '$1' (train arguments go after --)" >&2; exit 2 ;;
    esac
    shift
  done
  local missing=""
  [[ -n "$type" ]] || missing+=" --type"
  [[ -n "$zone" ]] || missing+=" --zone"
  [[ -n "$version" ]] || missing+=" --version"
  if [[ -n "$missing" ]] || (($# == 0)); then
    [[ -z "$missing" ]] || echo "tpu_vm.sh: missing$missing" >&2
    usage >&2
    exit 2
  fi
  local workdir="" arg
  for arg in "$@"; do
    [[ "$arg" != --workdir=* ]] || workdir=${arg#--workdir=}
  done
  if [[ -z "$workdir" && -n "$bucket" ]]; then
    workdir="gs://${bucket#gs://}/runs/$NAME"
    set -- "$@" "--workdir=$workdir"
  fi
  if [[ -z "$workdir" ]]; then
    echo "tpu_vm.sh: the train arguments need --workdir=DIR (or give --bucket=gs://BUCKET)" >&2
    exit 2
  fi
  local size=${type##*-}
  if [[ "$size" =~ ^[0-9]+$ ]] && ((size > 8)) && [[ "$workdir" != gs://* ]]; then
    echo "tpu_vm.sh: warning: $type has several hosts; --workdir=$workdir must be shared by all of" \
         "them (use gs://... or a shared filesystem), or the trainer stops at start" >&2
  fi

  SCOPE=("--zone=$zone")
  [[ -z "$project" ]] || SCOPE+=("--project=$project")
  local archive
  archive="${TMPDIR:-/tmp}/$NAME.tar.gz"
  local -a create=(gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}"
                   "--accelerator-type=$type" "--version=$version")
  [[ "$spot" == 0 ]] || create+=(--spot)

  local install train_command run stream wait_all
  install="set -e; mkdir -p $REMOTE_DIR && tar -xzf \$HOME/codepmp_src.tar.gz -C $REMOTE_DIR"
  install+=" && cd $REMOTE_DIR"
  [[ -z "$setup" ]] || install+=" && $setup"
  install+=" && $(quote_word "$python") -m pip install -q -r requirements.txt $(quote_word "$jax_spec")"
  train_command="$(print_command "$python" -m codepmp_jax.train "$@" --config.distributed.initialize=true)"
  train_command+="; echo \$? > $STATUS"
  run="cd $REMOTE_DIR && rm -f $STATUS && nohup bash -c $(quote_word "$train_command")"
  run+=" > $LOG 2>&1 < /dev/null &"
  stream="tail -n +1 -F $LOG & tail_pid=\$!; until [ -f $STATUS ]; do sleep 5; done; sleep 2; kill \$tail_pid"
  wait_all="until [ -f $STATUS ]; do sleep 5; done; exit \"\$(cat $STATUS)\""

  step "package the checkout" bash -c "cd $(quote_word "$ROOT") && git ls-files -co --exclude-standard -z | tar --null -T - -czf $(quote_word "$archive")"
  step "create the TPU VM" "${create[@]}"
  if [[ "$keep" == 0 && "$DRY_RUN" == 0 ]]; then
    trap delete_vm EXIT
  fi
  step "copy the checkout to every worker" gcloud compute tpus tpu-vm scp "$archive" "$NAME:codepmp_src.tar.gz" "${SCOPE[@]}" --worker=all
  step "install on every worker" gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all "--command=$install"
  step "start training on every worker" gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all "--command=$run"
  step "stream worker 0's log" gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=0 "--command=$stream"
  local status=0
  step "wait for every worker's exit status" gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all "--command=$wait_all" || status=$?
  if [[ -n "$fetch" ]]; then
    local remote_workdir=$workdir
    [[ "$workdir" == /* ]] || remote_workdir="codepmp_jax/$workdir"
    step "fetch the workdir from worker 0" mkdir -p "$fetch"
    step "" gcloud compute tpus tpu-vm scp --recurse "$NAME:$remote_workdir" "$fetch" "${SCOPE[@]}" --worker=0
  fi
  if [[ "$keep" == 0 && "$DRY_RUN" == 1 ]]; then
    delete_vm
  fi
  if ((status != 0)); then
    echo "tpu_vm.sh: training failed on at least one worker (status $status); see $LOG on the workers" >&2
    exit "$status"
  fi
}

# Deletes the VM (the EXIT trap, so that a failed or interrupted run does not leave it running).
delete_vm() {
  step "delete the TPU VM" gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet
}

# Runs (or with --dry-run prints) one command, saying what it does.
step() {
  local what=$1
  shift
  if [[ "$DRY_RUN" == 1 ]]; then
    print_command "$@"
    return
  fi
  [[ -z "$what" ]] || echo "tpu_vm.sh: $what" >&2
  "$@"
}

main "$@"
