#!/usr/bin/env bash
# N JAX processes on this machine, joined with jax.distributed over 127.0.0.1 (CPU collectives via gloo), each
# simulating D CPU devices: the multi-host code path (process-local data, cross-process collectives, multi-process
# checkpoints) without a cluster.
#   launch/local_multiprocess.sh [--processes N] [--devices-per-process D] [--port P] COMMAND [ARGS ...]
#   e.g. launch/local_multiprocess.sh --processes 2 --devices-per-process 4 train configs/tiny_cpu.yaml
# Process 0's output goes to the terminal; process i>0 writes to ${LONGTRAIN_LOG_DIR:-/tmp}/longtrain_proc<i>.log.
set -euo pipefail
NPROC=2; DEVS=4; PORT="${LONGTRAIN_PORT:-$((20000 + RANDOM % 20000))}"
while [ $# -gt 0 ]; do
  case "$1" in
    --processes) NPROC="$2"; shift 2 ;;
    --devices-per-process) DEVS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    *) break ;;
  esac
done
source "$(dirname "${BASH_SOURCE[0]}")/_longtrain.sh"
LOG_DIR="${LONGTRAIN_LOG_DIR:-/tmp}"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//') --xla_force_host_platform_device_count=${DEVS}"
export LONGTRAIN_COORDINATOR="127.0.0.1:${PORT}" LONGTRAIN_NUM_PROCESSES="${NPROC}"
pids=()
signals=0
# SIGTERM or SIGINT (Ctrl-C) here becomes SIGTERM for every process (background processes of a script ignore
# SIGINT); each finishes its step, saves and exits 0, and so does this script
forward() { signals=$((signals + 1)); for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap forward TERM INT
for ((i = 1; i < NPROC; i++)); do
  LONGTRAIN_PROCESS_ID=$i "${LONGTRAIN[@]}" "$@" >"${LOG_DIR}/longtrain_proc${i}.log" 2>&1 &
  pids+=($!)
done
LONGTRAIN_PROCESS_ID=0 "${LONGTRAIN[@]}" "$@" &
pids+=($!)
status=0
for p in "${pids[@]}"; do
  while :; do  # a trapped signal interrupts `wait` (status 128+n): wait again for the process's own exit status
    seen=$signals; rc=0
    wait "$p" || rc=$?
    [ "$signals" -eq "$seen" ] && break
  done
  [ "$rc" -eq 0 ] || status=$rc
done
exit $status
