#!/usr/bin/env bash
# One-command GPU check: the gpu-marked tests, then the GPU benchmarks, then one table.
#   flash attention pallas vs cudnn vs xla (benchmarks/attention_gpu.py, T up to 16K)
#   lightning attention pallas vs xla      (benchmarks/lightning_speed.py --pallas, T up to 16K)
#   context strategies over the visible GPUs (benchmarks/context_gpu.py, 32K tokens)
#   a short train of llama_1b_32k shrunk to the visible GPUs (synthetic data, 8K tokens, 30 steps) with MFU
# Sized for one H100 in under 8 minutes; each part has its own time limit, so one slow part cannot sink the rest.
# On a machine without a GPU it says so and exits 0. Logs stay in $GPU_SUITE_OUT (default: a fresh temp folder).
#   bash benchmarks/gpu_suite.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

platform=$($PY -c "import jax; print(jax.devices()[0].platform)" 2>/dev/null || echo none)
if [ "$platform" != "gpu" ]; then
  echo "gpu_suite: no GPU present (jax platform: $platform); nothing to measure"
  exit 0
fi

out=${GPU_SUITE_OUT:-$(mktemp -d -t longtrain_gpu_suite.XXXX)}
mkdir -p "$out"
declare -a rows
failed=0

part() {  # part NAME LIMIT_S COMMAND...: run it, log it, keep a table row (status, seconds, the log's last line)
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$? dt=$((SECONDS - t0)) status=ok
  if [ $rc -eq 124 ]; then status="timed out (${limit} s)"; failed=1
  elif [ $rc -ne 0 ]; then status="FAILED (exit $rc)"; failed=1; fi
  rows+=("| $name | $status | $dt s | $out/$name.log |")
  echo "gpu_suite: $name: $status in $dt s" >&2
}

part tests 150 $PY -m pytest -q -m gpu tests
part attention 120 $PY benchmarks/attention_gpu.py --max-t 16384 --tokens 65536 --iters 5
part lightning 60 $PY benchmarks/lightning_speed.py --pallas --max-t 16384 --tokens 65536 --heads 16 \
  --head-dim 128 --softmax-max-t 0 --budget-s 0.5
part context 60 $PY benchmarks/context_gpu.py --seq 32768 --iters 3
part train 120 $PY -m longtrain train configs/llama_1b_32k.yaml mesh.data=-1 mesh.fsdp=1 mesh.context=1 \
  data.source=synthetic data.tokenizer=byte data.seq_len=8192 data.batch_size=1 train.steps=30 \
  optim.warmup_steps=5 train.eval_every=0 train.export_hf=false checkpoint.enabled=false logging.every=1 \
  logging.progress=plain logging.wandb_mode=disabled "train.output_dir=$out/train_run"

echo
echo "# longtrain GPU suite: $($PY -c "import jax; print(jax.device_count(), 'x', jax.devices()[0].device_kind, '/ jax', jax.__version__)")"
echo
echo "| part | status | time | log |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
for name in attention lightning context; do
  echo
  echo "## $name"
  grep '^|' "$out/$name.log" || tail -3 "$out/$name.log"
done
echo
echo "## train (llama_1b_32k on the visible GPUs, 8K tokens, steps 11-30)"
$PY - "$out/train_run/metrics.jsonl" <<'EOF'
import json, statistics, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
except OSError as e:
    sys.exit(f"no metrics: {e}")
train = [r for r in rows if r.get("kind") == "train" and r["step"] > 10]
if not train:
    sys.exit("no train steps after step 10")
mfu = [r["mfu"] for r in train if r.get("mfu") is not None]
print("| steps | loss (last) | tokens/s (median) | step ms (median) | MFU (median) |")
print("|---|---|---|---|---|")
print(f"| {train[0]['step']}-{train[-1]['step']} | {train[-1]['loss']:.3f} | "
      f"{statistics.median(r['tokens_per_s'] for r in train):,.0f} | "
      f"{1e3 * statistics.median(r['step_time_s'] for r in train):.1f} | "
      + (f"{100 * statistics.median(mfu):.1f}%" if mfu else "n/a (device not in the peak table)") + " |")
EOF
exit $failed
