#!/usr/bin/env bash
# One process on this machine. With --devices N, JAX simulates N CPU devices (for trying meshes on a laptop).
#   launch/local.sh [--devices N] COMMAND [ARGS ...]
#   e.g. launch/local.sh --devices 8 train configs/tiny_cpu.yaml
#        launch/local.sh --devices 8 plan configs/llama_8b_128k.yaml --memory-limit 80GiB
set -euo pipefail
if [ "${1:-}" = "--devices" ]; then
  export XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//') --xla_force_host_platform_device_count=$2"
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  shift 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/_longtrain.sh"
exec "${LONGTRAIN[@]}" "$@"
