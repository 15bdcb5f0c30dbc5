"""Gather documents into global steps of a token budget (balance mode): the input of the balance scheduler.

Documents deferred by earlier steps go first (oldest first), then new ones from the stream; each is taken if it
still fits the budget, else it waits. At most `window` documents wait, so the step fills to within the smallest
waiting document of the budget while no document is held back for more than a few steps. Deterministic.
"""
from __future__ import annotations

from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


class StepFiller:
    """`next_step(stream)` -> the items of one step, total `size` <= `budget`; waiting items are `pending`."""

    def __init__(self, budget: int, *, window: int = 256, size: Callable[[T], int] = int,
                 max_doc_len: int | None = None):
        if budget < 1:
            raise ValueError(f"StepFiller: budget={budget} must be >= 1")
        if window < 1:
            raise ValueError(f"StepFiller: window={window} must be >= 1")
        self.budget = budget
        self.window = window
        self.size = size
        self.max_doc_len = min(budget, max_doc_len or budget)
        self.pending: list = []

    def next_step(self, stream: Iterator[T]) -> list[T]:
        """Items for one step. Raises StopIteration when the stream and the pending items are exhausted."""
        step, used, waiting = [], 0, []
        for item in self.pending:
            n = self.size(item)
            if used + n <= self.budget:
                step.append(item)
                used += n
            else:
                waiting.append(item)
        while used < self.budget and len(waiting) < self.window:
            try:
                item = next(stream)
            except StopIteration:
                break
            n = self.size(item)
            if n > self.max_doc_len:
                raise ValueError(f"StepFiller: a document of {n} tokens exceeds max_doc_len={self.max_doc_len}; "
                                 f"cut documents to that length before gathering steps")
            if used + n <= self.budget:
                step.append(item)
                used += n
            else:
                waiting.append(item)
        self.pending = waiting
        if not step:
            raise StopIteration
        return step
