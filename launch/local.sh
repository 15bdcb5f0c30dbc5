#!/usr/bin/env bash
# One process on this machine. With --devices N, JAX simulates N CPU devices (for trying meshes on a laptop).
#   launch/local.sh [--devices N] COMMAND [ARGS ...]      e.g. launch/local.sh --devices 8 config configs/tiny_cpu.yaml
set -euo pipefail
if [ "${1:-}" = "--devices" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$2"
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  shift 2
fi
exec python3 -m longtrain "$@"
