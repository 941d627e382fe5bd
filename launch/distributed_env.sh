#!/usr/bin/env bash
# Multi-process settings for `jax.distributed.initialize`, shared by the GPU launchers.
#
# Usage:
#   source launch/distributed_env.sh        # defines the functions below
#   launch/distributed_env.sh               # prints the overrides for this Slurm task, one a line
#
# Functions:
#   distributed_first_host NODELIST          first host of a Slurm node list ("gpu[003-005,9]" -> gpu003)
#   distributed_port                         the coordinator port: $COORDINATOR_PORT, else one derived
#                                            from $SLURM_JOB_ID (as JAX's Slurm detection does), else 12355
#   distributed_overrides ADDRESS COUNT ID   the `--config.distributed.*` overrides, one a line
#                                            (nothing for a single process)
#   slurm_distributed_overrides              the same, from SLURM_PROCID, SLURM_NTASKS and the first
#                                            host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST) by
#                                            `scontrol show hostnames` when present
#   slurm_tasks_per_node                     processes on this node: SLURM_NTASKS_PER_NODE, else
#                                            SLURM_NTASKS / SLURM_JOB_NUM_NODES
#   distributed_bind_gpu LOCAL_ID LOCAL_COUNT
#                                            with several processes on a node, makes process LOCAL_ID
#                                            see only its own GPU (CUDA_VISIBLE_DEVICES)
#   print_command ARGS...                    a command line that can be pasted back into a shell
set -euo pipefail

distributed_first_host() {
  local nodelist=$1
  if [[ -z "$nodelist" ]]; then
    echo "distributed_env.sh: empty node list" >&2
    return 1
  fi
  if command -v scontrol >/dev/null 2>&1; then
    # All of its output, then the first line: `| head -n 1` would die of SIGPIPE under pipefail.
    local hosts
    hosts=$(scontrol show hostnames "$nodelist")
    echo "${hosts%%$'\n'*}"
    return
  fi
  # Without scontrol: the first entry of "prefix[ranges]suffix,..." with its first number, leading
  # zeros kept ("node[007-009]" -> node007).
  local prefix=${nodelist%%[,[]*}
  local rest=${nodelist:${#prefix}}
  if [[ "$rest" != \[* ]]; then
    echo "$prefix"
    return
  fi
  local ranges=${rest#\[}
  ranges=${ranges%%]*}
  local after=${rest#*]}
  echo "${prefix}${ranges%%[,-]*}${after%%,*}"
}

distributed_port() {
  if [[ -n "${COORDINATOR_PORT:-}" ]]; then
    echo "$COORDINATOR_PORT"
  elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # Distinct per job, so two jobs sharing a first node do not collide (JAX's SlurmCluster rule).
    echo $((SLURM_JOB_ID % 4096 + 61440))
  else
    echo 12355
  fi
}

_distributed_require_int() {
  if ! [[ "$2" =~ ^[0-9]+$ ]]; then
    echo "distributed_env.sh: $1 must be a non-negative integer, got '$2'" >&2
    return 1
  fi
}

distributed_overrides() {
  local address=$1 count=$2 id=$3
  _distributed_require_int "the process count" "$count"
  _distributed_require_int "the process id" "$id"
  if ((id >= count)); then
    echo "distributed_env.sh: process id $id is not below the process count $count" >&2
    return 1
  fi
  if ((count == 1)); then
    return
  fi
  if [[ "$address" != *:* ]]; then
    echo "distributed_env.sh: coordinator address '$address' needs HOST:PORT" >&2
    return 1
  fi
  echo "--config.distributed.coordinator_address=$address"
  echo "--config.distributed.num_processes=$count"
  echo "--config.distributed.process_id=$id"
}

slurm_distributed_overrides() {
  local name
  for name in SLURM_PROCID SLURM_NTASKS; do
    if [[ -z "${!name:-}" ]]; then
      echo "distributed_env.sh: $name is not set (run inside srun)" >&2
      return 1
    fi
  done
  local nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}}
  local host
  host=$(distributed_first_host "$nodelist")
  distributed_overrides "$host:$(distributed_port)" "$SLURM_NTASKS" "$SLURM_PROCID"
}

slurm_tasks_per_node() {
  if [[ -n "${SLURM_NTASKS_PER_NODE:-}" ]]; then
    echo "$SLURM_NTASKS_PER_NODE"
  else
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    echo $((SLURM_NTASKS / nodes))
  fi
}

distributed_bind_gpu() {
  local local_id=$1 local_count=$2
  if ((local_count <= 1)); then
    return
  fi
  if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    export CUDA_VISIBLE_DEVICES=$local_id
    return
  fi
  local -a visible
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  if ((${#visible[@]} == 1)); then
    return  # already one GPU per process (e.g. srun --gpus-per-task=1)
  fi
  if ((local_id >= ${#visible[@]})); then
    echo "distributed_env.sh: local process $local_id but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2
    return 1
  fi
  export CUDA_VISIBLE_DEVICES=${visible[$local_id]}
}

# One argument as the shell reads it back: bare when safe, else single-quoted.
quote_word() {
  local word=$1 escaped="'\\''"
  if [[ "$word" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/$escaped}"
  fi
}

# A command line that can be pasted back into a shell.
print_command() {
  local line="" word
  for word in "$@"; do
    line+="${line:+ }$(quote_word "$word")"
  done
  echo "$line"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  slurm_distributed_overrides
fi
