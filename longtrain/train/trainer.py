"""The training loop: build mesh, data, state; resume; step, log, evaluate, checkpoint; stop cleanly.

Order of start-up matters for users: everything that can fail from a bad config or a missing file (data sources,
mesh shape, model config, init_from folder) fails BEFORE anything is compiled. Parameters are initialised by a
jitted init whose `out_shardings` are the parameter shardings, so each device creates only its shard (no full host
copy). The train step is compiled ahead of time (so logged step times exclude compilation) with the state donated.

Exit codes: 0 done or stopped by SIGTERM/SIGINT after saving; 3 after `train.max_nonfinite_steps` NaN/inf steps in
a row (the message names the step).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from longtrain.config import Config, ConfigError, to_dict
from longtrain.config.resume import resume_changes
from longtrain.errors import DataError
from longtrain.train import setup
from longtrain.train.checkpoint import Checkpointer
from longtrain.train.init_from import check_init_from, inherit_token_ids, load_params
from longtrain.train.metrics import (MetricsFile, WandbSink, document_lengths, peak_flops_per_device,
                                     train_flops_of_lengths)
from longtrain.train.model_loss import make_eval_step
from longtrain.train.processes import any_process
from longtrain.train.progress import make_progress
from longtrain.train.report import PLOT_NAME, plot_curves, summary_lines
from longtrain.train.signals import StopRequest
from longtrain.train.program import build_program

EXIT_OK = 0
EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
    """Too many NaN/inf steps in a row."""


@dataclasses.dataclass
class TrainResult:
    exit_code: int
    final_step: int
    stopped_by: str | None  # signal name, "nonfinite", or None when all steps ran
    export_dir: str | None = None


def checkpoint_dir(config: Config) -> str:
    return config.checkpoint.dir or os.path.join(config.train.output_dir, "checkpoints")


def _host_metrics(metrics: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in jax.device_get(metrics).items()}


def _nan_plan(step_plan: dict) -> dict:
    """The step plan with a NaN loss mask in every micro-batch (and in the stacked form of a uniform plan)."""
    nan = lambda b: {**b, "loss_mask": np.full_like(b["loss_mask"], np.nan)}  # noqa: E731
    out = {**step_plan, "micro_batches": [nan(mb) for mb in step_plan["micro_batches"]],
           "num_targets": float("nan")}
    if "stacked" in step_plan:
        out["stacked"] = nan(step_plan["stacked"])
    return out


def _document_lengths(host_batch: dict) -> np.ndarray:
    """Token length of every document of the step: from the segment ids of the (global) batch, or in balance mode
    from the step's plan (global; a process holds only its ranks' rows, and a split document is one sequence)."""
    if "plan" in host_batch:
        return np.asarray(host_batch["plan"].lengths)
    return document_lengths(host_batch["segment_ids"])


def _bad_record_counts(dataset) -> dict:
    """{"bad_records": n, "bad_records_by_reason": {...}} when the data had bad records so far, else {}."""
    stats = dataset.stats() if hasattr(dataset, "stats") else {}
    if not stats.get("skipped"):
        return {}
    return {"bad_records": stats["skipped"], "bad_records_by_reason": dict(stats["by_reason"]),
            "first_bad_record": stats["first_bad"]}


def check_resume(config: Config, saved: dict, step: int) -> str | None:
    """Refuse to resume checkpoint `step` (config `saved`) under a changed model or data stream, naming the keys;
    -> the message that says which other settings changed (None if none did)."""
    current = json.loads(json.dumps(to_dict(config)))  # the form the checkpoint stored (lists, not tuples)
    refused, allowed = resume_changes(saved, current, defaults=json.loads(json.dumps(to_dict(Config()))))
    if refused:
        raise ConfigError(f"cannot resume from checkpoint step {step} in {checkpoint_dir(config)}: changed since "
                          f"it was written: {'; '.join(refused)} (keep them, or train into a new train.output_dir)")
    return f"longtrain: resuming from step {step} with changed settings: {'; '.join(allowed)}" if allowed else None


def evaluate(config: Config, session: "setup.Session", params: Any, eval_fn) -> dict:
    """Loss / perplexity on held-out batches; for the synthetic task also retrieval accuracy (documents whose
    answer tokens are all predicted right) and answer-token accuracy."""
    total, count = 0.0, 0.0
    docs_right, docs, tokens_right, tokens = 0.0, 0, 0.0, 0
    dataset = session.make_eval_dataset()
    for _ in range(config.train.eval_batches):
        host_batch = next(dataset)
        out = jax.device_get(eval_fn(params, session.put_batch(host_batch)))
        total += float(out["loss_sum"])
        count += float(out["num_targets"])
        if session.score_fn is not None and "answer_mask" in host_batch:
            predictions = np.asarray(out["predictions"])
            if session.layout_perm is not None:  # back from layout order to the host batch's token order
                predictions = predictions[:, np.argsort(session.layout_perm)]
            score = session.score_fn(predictions, host_batch)
            n_tok = int(np.sum(np.asarray(host_batch["answer_mask"]) > 0))
            if score["num_answers"]:
                docs_right += score["exact_match"] * score["num_answers"]
                docs += score["num_answers"]
                tokens_right += score["token_accuracy"] * n_tok
                tokens += n_tok
    loss = total / max(count, 1.0)
    record = {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 80.0)))}
    if docs:
        record["eval_retrieval_accuracy"] = docs_right / docs
        record["eval_answer_token_accuracy"] = tokens_right / tokens
    return record


def train(config: Config) -> TrainResult:
    """Run `config` to `train.steps` (resuming from the latest checkpoint). Returns the exit code to use."""
    t_start = time.perf_counter()
    check_init_from(config.train.init_from)
    inherited = inherit_token_ids(config)  # before config_dict: checkpoints and the HF export carry them
    session = setup.build_session(config)  # mesh, runtime, data: fails on bad config/missing data before compiling
    main = jax.process_index() == 0

    def note(message: str) -> None:  # start-up messages (the progress display does not exist yet)
        if main:
            print(message, file=sys.stderr, flush=True)

    if inherited:
        note(f"longtrain: special token ids from train.init_from: {', '.join(inherited)}")
    config_dict = to_dict(config)
    total_steps = config.train.steps
    program = build_program(config, session)
    state_shardings, abstract_state = program.state_shardings, program.abstract_state

    ckpt = Checkpointer(checkpoint_dir(config), keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save) if config.checkpoint.enabled else None
    restored = None
    if ckpt is not None and config.checkpoint.resume:
        restored = ckpt.restore_latest(abstract_state, report=note,
                                       check_config=lambda step, saved: check_resume(config, saved, step))
    latest = restored[0] if restored is not None else None
    if restored is not None:
        _, state, data_state, _ = restored
        session.dataset.set_state(data_state)
    elif config.train.init_from is not None:
        params = load_params(config.train.init_from, config.model, abstract_state["params"])
        state = program.init_with_params(params)
    else:
        state = program.init(jax.random.PRNGKey(config.train.seed))
    start_step = int(jax.device_get(state["step"]))

    train_step = program.step  # every step executes a plan (train/executor.py)
    t0 = time.perf_counter()  # compile the fused step ahead of time, so step times are step times
    ahead = train_step.compile_fused(abstract_state, session.abstract_batch())
    compile_s = time.perf_counter() - t0
    eval_fn = jax.jit(make_eval_step(config, session.runtime), in_shardings=(state_shardings["params"],
                                                                              session.batch_sharding))

    metrics_path = config.logging.metrics_file or os.path.join(config.train.output_dir, "metrics.jsonl")
    metrics_file = MetricsFile(metrics_path, keep_through_step=start_step) if main else None
    plot_path = os.path.join(os.path.dirname(os.path.abspath(metrics_path)), PLOT_NAME)
    wandb = WandbSink(config, config_dict) if main else None
    progress = make_progress(config.logging.progress, total_steps, start_step, main)
    if latest is not None:
        progress.message(f"resumed from checkpoint step {latest} in {ckpt.directory}")
    progress.message((f"compiled the train step in {compile_s:.1f}s" if ahead else
                      "balance mode: one program per micro-batch shape (c, C), compiled on first use") + "; mesh "
                     + " x ".join(f"{k}={v}" for k, v in session.mesh.shape.items()))
    peak = peak_flops_per_device(jax.devices()[0].device_kind)
    profile = tuple(config.train.profile_steps or ())
    inject_nan = set(config.train.inject_nan_steps or ())

    def log(record):
        if metrics_file is not None:
            metrics_file.write(record)
        if wandb is not None:
            wandb.log(record, step=record["step"])

    def save(step):
        if ckpt is not None:
            ckpt.save(step, state, session.dataset.get_state(), config_dict)

    def plot():
        if metrics_file is not None:
            return plot_curves(metrics_path, plot_path)
        return None

    stopped_by, exit_code, step, tracing = None, EXIT_OK, start_step, False
    last_train, last_eval, timed_tokens, timed_s = None, None, 0.0, 0.0
    try:
        with StopRequest() as stop:
            while step < total_steps:
                if profile and step == profile[0]:  # trace 0-based steps profile[0]..profile[-1]
                    jax.profiler.start_trace(os.path.join(config.train.output_dir, "profile"))
                    tracing = True
                try:
                    host_batch = next(session.dataset)
                except DataError as e:  # e.g. a bad record under data.strict: keep the progress, then stop
                    if step > start_step and step % config.checkpoint.every and ckpt is not None:
                        save(step)
                        ckpt.wait()
                    kept = f"; training state saved at step {step}" if ckpt is not None and step else ""
                    raise DataError(f"{e}{kept} (fix the data, or set data.strict=false to skip bad records, "
                                    "and run again to resume)") from e
                step_plan = session.step_plan(host_batch)
                if step in inject_nan:  # fault injection: a NaN batch, so the skip path runs on the real program
                    step_plan = _nan_plan(step_plan)
                t0 = time.perf_counter()
                if "plan" in step_plan:  # the balance scheduler's: which micro-batches at which context degree
                    progress.message(f"step {step + 1} plan {step_plan['plan'].describe()}")
                state, metrics = train_step(state, step_plan)
                record = _host_metrics(metrics)  # waits for the step: step time is real device time
                dt = time.perf_counter() - t0
                step += 1
                if tracing and step - 1 == profile[-1]:
                    jax.profiler.stop_trace()
                    tracing = False
                lengths = _document_lengths(host_batch)
                flops = train_flops_of_lengths(config.model, lengths)
                record.update(kind="train", step=step, step_time_s=dt, tokens_per_s=float(lengths.sum()) / dt,
                              skipped=not record.pop("finite"),
                              mfu=(flops / dt / (peak[1] * jax.device_count())) if peak else None)
                if step > start_step + 1:  # throughput over the steps after this session's first
                    timed_tokens, timed_s = timed_tokens + float(lengths.sum()), timed_s + dt
                if not record["skipped"]:
                    last_train = record
                if step % config.logging.every == 0 or record["skipped"] or step == total_steps:
                    record.update(_bad_record_counts(session.dataset))
                    log(record)
                    progress.update(record)
                if record["nonfinite_run"] >= config.train.max_nonfinite_steps:
                    stopped_by, exit_code = "nonfinite", EXIT_NONFINITE
                    progress.message(
                        f"longtrain: stopping at step {step}: {record['nonfinite_run']} steps in a row had a "
                        f"NaN/inf loss or gradient (train.max_nonfinite_steps={config.train.max_nonfinite_steps})")
                    break
                if config.train.eval_every and step % config.train.eval_every == 0:
                    ev = evaluate(config, session, state["params"], eval_fn)
                    ev.update(kind="eval", step=step)
                    log(ev)
                    last_eval = ev
                    plot()
                    progress.message(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in ev.items() if k != "kind"))
                if step % config.checkpoint.every == 0 or step == total_steps:
                    save(step)
                if any_process(stop.requested is not None):  # all stop after the same step
                    stopped_by = stop.requested or "a signal on another process"
                    if step % config.checkpoint.every and step != total_steps:
                        save(step)
                    progress.message(f"longtrain: stopped by {stopped_by} after step {step}; "
                                     f"checkpoint saved in {checkpoint_dir(config)}")
                    break
            if ckpt is not None:
                ckpt.wait()
    finally:
        if tracing:
            jax.profiler.stop_trace()
        final_bad = _bad_record_counts(session.dataset)
        if hasattr(session.dataset, "close"):
            session.dataset.close()  # the prefetch thread
        progress.close()
        if ckpt is not None:
            ckpt.close()
        if metrics_file is not None:
            metrics_file.close()
        if wandb is not None:
            wandb.close()

    export_dir = None
    if config.train.export_hf and stopped_by is None:
        export_dir = session.export_hf(state["params"])
        if main:
            print(f"exported Hugging Face model to {export_dir}", flush=True)
    if main:
        lines = summary_lines(
            steps=step, wall_s=time.perf_counter() - t_start, last_train=last_train, last_eval=last_eval,
            tokens_per_s=(timed_tokens / timed_s) if timed_s > 0 else None,
            checkpoint_dir=checkpoint_dir(config) if ckpt is not None else None, export_dir=export_dir,
            metrics_path=metrics_path, plot_path=plot(), bad_records=final_bad)
        print("\n".join(lines), flush=True)
    return TrainResult(exit_code=exit_code, final_step=step, stopped_by=stopped_by, export_dir=export_dir)
