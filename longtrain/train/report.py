"""The end of a run, for a person: a PNG of the loss and eval curves beside `metrics.jsonl`, and a short summary.

People would rather look at a curve than read hundreds of lines: `plot_curves` draws train loss and eval loss per
step (and the synthetic task's retrieval accuracy when evaluated) from the metrics file, the whole history of the
run across resumes (the last record of each step counts). `summary_lines` says in a few lines how the run ended and
where its outputs are.
"""
from __future__ import annotations

import math
import os

from longtrain.train.metrics import read_metrics

PLOT_NAME = "curves.png"


def plot_curves(metrics_path: str, png_path: str) -> str | None:
    """Write the curves of `metrics_path` to `png_path`; returns the path, or None when nothing was logged."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works without a display

    train = read_metrics(metrics_path, kind="train")
    evals = read_metrics(metrics_path, kind="eval")
    if not train and not evals:
        return None
    accuracy = {s: r["eval_retrieval_accuracy"] for s, r in evals.items() if "eval_retrieval_accuracy" in r}
    fig = Figure(figsize=(9, 3.6 if not accuracy else 6.4), dpi=100, layout="constrained")
    axes = fig.subplots(2 if accuracy else 1, 1, sharex=True, squeeze=False)[:, 0]
    loss_ax = axes[0]
    finite = [(s, r["loss"]) for s, r in sorted(train.items()) if not r.get("skipped") and math.isfinite(r["loss"])]
    if finite:
        loss_ax.plot(*zip(*finite), label="train loss", linewidth=1)
    if evals:
        loss_ax.plot(*zip(*sorted((s, r["eval_loss"]) for s, r in evals.items())), "o-", label="eval loss")
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.set_yscale("log")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend()
    if accuracy:
        acc_ax = axes[1]
        acc_ax.plot(*zip(*sorted(accuracy.items())), "o-", color="tab:green", label="eval retrieval accuracy")
        acc_ax.set_ylim(-0.02, 1.02)
        acc_ax.set_ylabel("retrieval accuracy")
        acc_ax.grid(True, alpha=0.3)
        acc_ax.legend()
    axes[-1].set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))) or "run")
    fig.savefig(png_path)
    return png_path


def summary_lines(*, steps: int, wall_s: float, last_train: dict | None, last_eval: dict | None,
                  tokens_per_s: float | None, checkpoint_dir: str | None, export_dir: str | None,
                  metrics_path: str | None, plot_path: str | None, bad_records: dict | None = None) -> list[str]:
    """The end-of-run summary: how far it got, the last losses and accuracy, throughput, and where things are."""
    lines = [f"summary: {steps} steps, {wall_s:.0f} s"]
    numbers = []
    if last_train is not None:
        numbers.append(f"final loss {last_train['loss']:.4f}")
    if last_eval is not None:
        numbers.append(f"eval loss {last_eval['eval_loss']:.4f}")
        if "eval_retrieval_accuracy" in last_eval:
            numbers.append(f"retrieval accuracy {last_eval['eval_retrieval_accuracy']:.2f}")
    if tokens_per_s is not None:
        numbers.append(f"{tokens_per_s:,.0f} tokens/s")
    if numbers:
        lines.append("  " + ", ".join(numbers))
    if bad_records:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(bad_records["bad_records_by_reason"].items()))
        lines.append(f"  bad records skipped: {bad_records['bad_records']} ({reasons}); first: "
                     f"{bad_records['first_bad_record']}")
    for name, where in (("checkpoints", checkpoint_dir), ("HF export", export_dir), ("metrics", metrics_path),
                        ("curves", plot_path)):
        if where:
            lines.append(f"  {name + ':':13s}{where}")
    return lines
