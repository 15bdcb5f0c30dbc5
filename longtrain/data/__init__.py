"""Data: sources, tokenizers, packing, the synthetic long-context tasks, the grain loader and the balance scheduler.

Entry points: `make_dataset` / `make_eval_dataset` (loader, see `pipeline.py`), `balance.schedule` / `metrics`
(scheduler), `plan_to_batches` (a plan as per-micro-batch arrays), `score_answers` (synthetic eval).
"""
from longtrain.data.balance import CostModel, Plan, ShapeMenu, metrics, schedule
from longtrain.data.packing import Document, count_targets, plan_to_batches
from longtrain.data.pipeline import DataIterator, make_dataset, make_eval_dataset
from longtrain.data.synthetic import score_answers, score_retrieval

__all__ = ["CostModel", "DataIterator", "Document", "Plan", "ShapeMenu", "count_targets", "make_dataset",
           "make_eval_dataset", "metrics", "plan_to_batches", "schedule", "score_answers", "score_retrieval"]
