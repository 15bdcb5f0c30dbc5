#!/usr/bin/env bash
# TPU pod slice (e.g. v5p-64): the same command runs on every host; jax.distributed auto-detects the pod.
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command "cd longtrain && launch/tpu_pod.sh configs/llama_8b_128k.yaml checkpoint.dir=gs://BUCKET/ckpt"
# Checkpoints must go to storage every host can reach (a gs:// bucket); orbax writes them from all hosts.
set -euo pipefail
# Overlap collectives with compute on TPU (async collective fusion and the latency-hiding scheduler are on by
# default in recent libtpu; these make the choices explicit).
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:-} \
  --xla_tpu_enable_async_collective_fusion=true \
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true \
  --xla_tpu_overlap_compute_collective_tc=true \
  --xla_enable_async_all_gather=true"
source "$(dirname "${BASH_SOURCE[0]}")/_longtrain.sh"
exec "${LONGTRAIN[@]}" train --distributed-auto "$@"
