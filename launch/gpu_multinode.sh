#!/usr/bin/env bash
# Multi-node GPU launcher for codepmp_jax.train without Slurm; --help prints its usage.
set -euo pipefail

usage() {
  cat <<'EOF'
Runs codepmp_jax.train on this node as part of a multi-node job: start it on every node (ssh, pdsh,
a Kubernetes job, ...) with the same coordinator and node count and this node's rank. Each process
gets the coordinator address, process count and id for jax.distributed.initialize.

Usage (from the repository root):
  launch/gpu_multinode.sh [--coordinator=HOST:PORT] [--num_nodes=N] [--node_rank=I]
      [--per_gpu [--gpus_per_node=G]] [--dry-run] -- --config=configs/x.py --workdir=DIR [--config.a.b=v ...]

  --coordinator    address of node 0 (default: $MASTER_ADDR:$MASTER_PORT, port 12355 if unset)
  --num_nodes      number of nodes (default: $NNODES, else $WORLD_SIZE, else 1)
  --node_rank      this node's rank, 0 = the coordinator's node (default: $NODE_RANK, else $RANK, else 0)
  --per_gpu        one process per GPU instead of one per node driving all its GPUs
  --gpus_per_node  GPUs per node with --per_gpu (default: the count of `nvidia-smi -L`)
  --dry-run        print the commands (with their CUDA_VISIBLE_DEVICES) instead of running them

Environment: PYTHON (default: .venv/bin/python if present, else python3). The workdir must be on
a file system that every node sees.
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/distributed_env.sh
source "$ROOT/launch/distributed_env.sh"

main() {
  local coordinator="" num_nodes=${NNODES:-${WORLD_SIZE:-1}} node_rank=${NODE_RANK:-${RANK:-0}}
  local per_gpu=0 gpus_per_node="" dry_run=0
  if [[ -n "${MASTER_ADDR:-}" ]]; then
    coordinator=$MASTER_ADDR:${MASTER_PORT:-12355}
  fi
  while (($#)); do
    case $1 in
      --coordinator=*) coordinator=${1#*=} ;;
      --num_nodes=*) num_nodes=${1#*=} ;;
      --node_rank=*) node_rank=${1#*=} ;;
      --per_gpu) per_gpu=1 ;;
      --gpus_per_node=*) gpus_per_node=${1#*=} ;;
      --dry-run) dry_run=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      *) echo "gpu_multinode.sh: unknown option '$1' (train arguments go after --)" >&2; exit 2 ;;
    esac
    shift
  done
  if (($# == 0)); then
    usage >&2
    exit 2
  fi
  _distributed_require_int "--num_nodes" "$num_nodes"
  _distributed_require_int "--node_rank" "$node_rank"
  if ((num_nodes > 1)) && [[ -z "$coordinator" ]]; then
    echo "gpu_multinode.sh: --coordinator (or MASTER_ADDR) is required with $num_nodes nodes" >&2
    exit 2
  fi
  local local_count=1
  if [[ "$per_gpu" == 1 ]]; then
    if [[ -z "$gpus_per_node" ]]; then
      gpus_per_node=$(nvidia-smi -L | grep -c '^GPU')
    fi
    _distributed_require_int "--gpus_per_node" "$gpus_per_node"
    local_count=$gpus_per_node
  fi
  if [[ -z "$coordinator" ]]; then
    coordinator=localhost:12355
  fi
  local python=${PYTHON:-python3}
  if [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then
    python=$ROOT/.venv/bin/python
  fi

  local -a pids=()
  local local_id
  for ((local_id = 0; local_id < local_count; local_id++)); do
    local process_id=$((node_rank * local_count + local_id))
    local text
    text=$(distributed_overrides "$coordinator" $((num_nodes * local_count)) "$process_id")
    local -a overrides=()
    if [[ -n "$text" ]]; then
      mapfile -t overrides <<<"$text"
    fi
    local -a command=("$python" -m codepmp_jax.train "$@" "${overrides[@]}")
    if [[ "$dry_run" == 1 ]]; then
      (distributed_bind_gpu "$local_id" "$local_count"
       printf 'CUDA_VISIBLE_DEVICES=%s ' "${CUDA_VISIBLE_DEVICES:-}"
       print_command "${command[@]}")
    elif ((local_count == 1)); then
      cd "$ROOT"
      exec "${command[@]}"
    else
      (distributed_bind_gpu "$local_id" "$local_count"
       cd "$ROOT"
       exec "${command[@]}") > >(sed -u "s/^/[process $process_id] /") 2>&1 &
      pids+=("$!")
    fi
  done
  wait_all "${pids[@]}"
}

# Waits for every process; when one fails, stops the others and exits with its status.
wait_all() {
  local -a pids=("$@")
  local status=0 pid
  while ((${#pids[@]})); do
    set +e
    wait -n -p pid "${pids[@]}"
    status=$?
    set -e
    local -a left=()
    local p
    for p in "${pids[@]}"; do
      [[ "$p" == "$pid" ]] || left+=("$p")
    done
    pids=("${left[@]}")
    if ((status != 0)); then
      echo "gpu_multinode.sh: process $pid exited with $status; stopping the others" >&2
      if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
      fi
      exit "$status"
    fi
  done
}

main "$@"
