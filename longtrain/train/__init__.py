"""The trainer: optimizer, train step, checkpoints, signals, metrics, progress and the training loop.

Modules, one job each:
  optim.py       AdamW with warmup + decay schedule, gradient clipping, weight-decay mask
  step.py        the step's math: micro-batch accumulation, global loss normalisation, clipping, NaN/inf skip
  executor.py    every step executes a plan of micro-batches (fused fast path for uniform plans)
  balance_views.py  balance mode's per-micro-batch views of the devices (context degree c, ZeRO-3 over the pool)
  checkpoint.py  orbax checkpoints (async, keep last K, resume, restore onto another mesh)
  signals.py     SIGTERM/SIGINT -> finish the step, save, exit 0
  metrics.py     FLOPs/MFU with a peak table, JSON-lines file, wandb
  progress.py    rich progress bar on a TTY, plain lines otherwise
  trainer.py     the loop that wires everything together
"""
