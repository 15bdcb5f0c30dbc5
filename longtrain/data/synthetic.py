"""Built-in synthetic long-context tasks (the default data): passkey retrieval and multi-query associative recall.

Each example is a list of text segments, some marked as answers; it is generated from (seed, index) alone, so the
source is random-access, deterministic and endless. Lengths (in characters, = tokens for the byte tokenizer) are
drawn per example from `lengths`: "fixed" (always max_len), "uniform" in [min_len, max_len], or "long_tail" (a
Pareto law clipped to [min_len, max_len], like real corpora: most examples short, a few very long).

* passkey: a 5-digit key hidden at a random depth in filler text; the answer is the key after the question.
* associative_recall: `key=value` pairs (4 letters = 4 digits) filling the context, then several queries
  `key=` whose answers are the values (multi-query associative recall, MQAR).

Segments carry a role: TEXT, ANSWER (scored in eval, weighted by `data.synthetic_answer_weight` in training) or
COPY (weighted like answers in training, never scored): a token that only copying from the context can predict,
such as the passkey's second spelling inside the needle. Weighting it trains the in-context copying circuit
that retrieval needs on a short distance, where the gradient finds it quickly; the answers are still scored
only at the question, far away.

`score_answers(predicted_BT, batch)` scores a model's greedy predictions at the answer positions.
"""
from __future__ import annotations

import dataclasses
import string

import numpy as np

TASKS = ("passkey", "associative_recall", "mixed")
LENGTH_LAWS = ("fixed", "uniform", "long_tail")
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


TEXT, ANSWER, COPY = 0, 1, 2  # segment roles


@dataclasses.dataclass(frozen=True)
class SyntheticDoc:
    segments: tuple[tuple[str, int], ...]  # (text, role)
    origin: str
    task: str

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


FILLERS = ("repeated", "random_words")


def _filler(n: int, offset: int) -> str:
    reps = _FILLER * (n // len(_FILLER) + 2)
    return reps[offset % len(_FILLER):][:n]


def _random_words(rng: np.random.Generator, n: int, num_words: int = 8) -> str:
    """n characters of words drawn from a vocabulary of `num_words` random lowercase words made for this document.
    Unlike the repeated sentence, a model cannot memorise it: past a word's first letters it is predictable only
    by copying from an earlier occurrence in the context (the in-context copying that retrieval needs too)."""
    letters = np.array(list(string.ascii_lowercase))
    vocab = ["".join(rng.choice(letters, int(rng.integers(3, 8)))) for _ in range(num_words)]
    words, size = [], 0
    while size < n:
        words.append(vocab[int(rng.integers(num_words))])
        size += len(words[-1]) + 1
    return " ".join(words)[:n]


def _distinct_digits(rng: np.random.Generator, n: int) -> list[int]:
    """n different digits, the first not 0: each digit of the key then names its successor without ambiguity."""
    first = int(rng.integers(1, 10))
    rest = rng.permutation([d for d in range(10) if d != first])[:n - 1]
    return [first, *map(int, rest)]


def passkey(rng: np.random.Generator, length: int, origin: str,
            needle_depth: tuple[float, float] = (0.0, 1.0), filler: str = "repeated") -> SyntheticDoc:
    """`needle_depth` (from, to): where the needle may lie, as fractions of the filler (0: right after the
    instructions, 1: right before the question); (0, 0.5) keeps the key at least half the filler away.
    `filler`: "repeated" (the classic passkey text, one sentence over and over) or "random_words"."""
    key = "".join(str(d) for d in _distinct_digits(rng, 5))
    head = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    needle = (f" The pass key is {key}. Remember it. ", key, " is the pass key. ")  # the 2nd key is a COPY
    question = " What is the pass key? The pass key is "
    room = max(0, length - len(head) - len("".join(needle)) - len(question) - len(key))
    before = int(rng.integers(int(needle_depth[0] * room), int(needle_depth[1] * room) + 1))
    if filler == "random_words":
        words = _random_words(rng, room + 1)
        before_text, after_text = words[:before], words[before + 1:]
    else:
        before_text, after_text = _filler(before, 0), _filler(room - before, before)
    return SyntheticDoc(((head + before_text + needle[0], TEXT), (needle[1], COPY),
                         (needle[2] + after_text + question, TEXT), (key, ANSWER), (".", TEXT)), origin, "passkey")


def associative_recall(rng: np.random.Generator, length: int, origin: str, num_queries: int = 4) -> SyntheticDoc:
    letters = np.array(list(string.ascii_lowercase))
    pair_len = len("abcd=1234, ")
    head = "Remember the values of these keys. "
    query_len = num_queries * pair_len + len(" Queries: ")
    num_pairs = max(num_queries, (length - len(head) - query_len) // pair_len)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < num_pairs:
        k = "".join(rng.choice(letters, 4))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = [f"{int(v)}" for v in rng.integers(1000, 10000, num_pairs)]
    context = head + ", ".join(f"{k}={v}" for k, v in zip(keys, values)) + ". Queries:"
    segments: list[tuple[str, int]] = [(context, TEXT)]
    for q in rng.choice(num_pairs, num_queries, replace=False):
        segments.append((f" {keys[q]}=", TEXT))
        segments.append((values[q], ANSWER))
        segments.append((",", TEXT))
    return SyntheticDoc(tuple(segments), origin, "associative_recall")


class SyntheticSource:
    """Endless random-access source of synthetic examples (`len` is a large number; grain repeats it anyway)."""

    def __init__(self, task: str = "mixed", *, min_len: int = 64, max_len: int = 256, lengths: str = "uniform",
                 seed: int = 0, size: int = 1 << 30, tail_alpha: float = 1.1,
                 needle_depth: tuple[float, float] = (0.0, 1.0), filler: str = "repeated"):
        if task not in TASKS:
            raise ValueError(f"data.synthetic_task={task!r} is not one of {TASKS}")
        if lengths not in LENGTH_LAWS:
            raise ValueError(f"data.synthetic_lengths={lengths!r} is not one of {LENGTH_LAWS}")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"synthetic lengths need 1 <= min_len ({min_len}) <= max_len ({max_len})")
        if len(needle_depth) != 2 or not 0.0 <= needle_depth[0] <= needle_depth[1] <= 1.0:
            raise ValueError(f"data.synthetic_needle_depth={list(needle_depth)} must be [from, to] with "
                             "0 <= from <= to <= 1")
        if filler not in FILLERS:
            raise ValueError(f"data.synthetic_filler={filler!r} is not one of {FILLERS}")
        self.needle_depth, self.filler = (float(needle_depth[0]), float(needle_depth[1])), filler
        self.task, self.min_len, self.max_len, self.lengths = task, min_len, max_len, lengths
        self.seed, self.size, self.tail_alpha = seed, size, tail_alpha

    def __len__(self) -> int:
        return self.size

    def length_of(self, rng: np.random.Generator) -> int:
        if self.lengths == "fixed":
            return self.max_len
        if self.lengths == "uniform":
            return int(rng.integers(self.min_len, self.max_len + 1))
        return int(min(self.max_len, self.min_len * (1.0 + rng.pareto(self.tail_alpha))))

    def __getitem__(self, i: int) -> SyntheticDoc:
        return self.generate(i)

    def generate(self, i: int, scale: float = 1.0) -> SyntheticDoc:
        """Example i; `scale` in (0, 1] shrinks its drawn length towards min_len (a length curriculum)."""
        rng = np.random.default_rng([self.seed, int(i)])
        length = self.length_of(rng)
        if scale < 1.0:
            length = self.min_len + int((length - self.min_len) * scale)
        task = self.task if self.task != "mixed" else ("passkey", "associative_recall")[int(rng.integers(2))]
        origin = f"synthetic:{task}:{i}"
        if task == "passkey":
            return passkey(rng, length, origin, self.needle_depth, self.filler)
        return associative_recall(rng, length, origin)


class LengthCurriculum:
    """Stream position k -> example k of `source` (this process's k-th: index process_index + k * process_count),
    its length scaled from synthetic_min_len at k = 0 up to the source's own law after `ramp_docs` examples.
    Picklable, for grain's `map`. Examples are independent draws, so the stream needs no shuffle."""

    def __init__(self, source: SyntheticSource, ramp_docs: int, process_index: int = 0, process_count: int = 1):
        self.source, self.ramp_docs = source, ramp_docs
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, k: int) -> SyntheticDoc:
        scale = min(1.0, (k + 1) / self.ramp_docs)
        return self.source.generate(self.process_index + k * self.process_count, scale)


def score_answers(predicted_BT, batch: dict) -> dict:
    """Accuracy of greedy predictions (`argmax` of the logits, [B,T]) at the answer positions of an eval batch.

    `batch["answer_mask"]` marks positions whose target is an answer token. Returns `token_accuracy` (over answer
    tokens) and `exact_match` (fraction of documents, by (row, segment id), whose answer tokens are all right).
    """
    if "answer_mask" not in batch:
        raise KeyError("score_answers: the batch has no 'answer_mask'; use a batch from make_eval_dataset")
    pred = np.asarray(predicted_BT)
    mask = np.asarray(batch["answer_mask"]) > 0
    if pred.shape != mask.shape:
        raise ValueError(f"score_answers: predictions {pred.shape} and answer_mask {mask.shape} differ in shape")
    right = (pred == np.asarray(batch["targets"])) & mask
    n = int(mask.sum())
    docs = {}
    seg = np.asarray(batch["segment_ids"])
    for b, t in zip(*np.nonzero(mask)):
        key = (int(b), int(seg[b, t]))
        docs[key] = docs.get(key, True) and bool(right[b, t])
    return {
        "token_accuracy": float(right.sum() / n) if n else float("nan"),
        "exact_match": float(np.mean(list(docs.values()))) if docs else float("nan"),
        "num_answers": len(docs),
    }


def score_retrieval(predicted_BT, batch: dict) -> tuple[int, int]:
    """(documents whose answers are all predicted right, documents with answers) in a batch: the trainer's
    eval sums both over batches for `eval_retrieval_accuracy`. Batches without `answer_mask` count (0, 0)."""
    if "answer_mask" not in batch:
        return 0, 0
    got = score_answers(predicted_BT, batch)
    n = got["num_answers"]
    return (round(got["exact_match"] * n) if n else 0), n
