"""Synthetic long-context tasks: passkey and multi-query associative recall at any length, and their scoring."""
import re

import numpy as np
import pytest

from longtrain.data.documents import Tokenize
from longtrain.data.synthetic import (ANSWER, COPY, SyntheticSource, associative_recall, passkey, score_answers,
                                      score_retrieval)
from longtrain.data.tokenizers import ByteTokenizer


@pytest.mark.parametrize("length", [200, 4096, 40_000])
def test_passkey_hides_the_answer_at_any_length(length):
    rng = np.random.default_rng(length)
    doc = passkey(rng, length, "t")
    text = doc.text
    answer = "".join(t for t, role in doc.segments if role == ANSWER)
    assert re.fullmatch(r"\d{5}", answer)
    assert text.count(f"The pass key is {answer}. Remember it.") == 1  # the needle holds the answer
    assert abs(len(text) - length) <= 2
    assert text.endswith(f"The pass key is {answer}.")
    copies = [t for t, role in doc.segments if role == COPY]  # the second spelling in the needle: a copy
    assert copies == [answer] and text.count(f"Remember it. {answer} is the pass key.") == 1


def test_passkey_needle_depth_keeps_the_key_far_from_the_question():
    """needle_depth=(0, 0.5): the key lies in the first half of the filler, so at least half of it separates the
    key from the question; (0.5, 1) puts it in the second half. Both ends are reached over many draws."""
    length, far, near = 1024, [], []
    for i in range(200):
        for depth, out in (((0.0, 0.5), far), ((0.5, 1.0), near)):
            doc = passkey(np.random.default_rng(i), length, "t", needle_depth=depth)
            text = doc.text
            key = "".join(t for t, role in doc.segments if role == ANSWER)
            out.append(len(text) - text.index(f"The pass key is {key}"))  # needle -> end of document
    filler = length - 200  # head, needle and question take under 200 characters
    assert min(far) >= filler / 2 and max(near) <= filler / 2 + 200
    assert max(far) > length - 250 and min(near) < 250  # uniform over the range: both ends occur


def test_random_words_filler_is_a_small_per_document_vocabulary():
    """filler="random_words": the text between instructions, needle and question is lowercase words from at most
    8 words per document (different documents, different words); the key is only in the needle and the answer."""
    head = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    vocabularies = []
    for i in range(20):
        doc = passkey(np.random.default_rng(i), 2000, "t", filler="random_words")
        text, key = doc.text, "".join(t for t, role in doc.segments if role == ANSWER)
        assert abs(len(text) - 2000) <= 2 and text.count(key) == 3 and re.fullmatch(r"\d{5}", key)
        assert len(set(key)) == 5 and key[0] != "0"  # distinct digits: each names its successor
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        filler = text[len(head):text.index(" What is the pass key?")].replace(needle, " ")
        words = set(filler.split())
        assert re.fullmatch(r"[a-z ]+", filler) and 2 <= len(words) <= 8 + 3  # +3: words cut at the needle, the end
        vocabularies.append(words)
    assert len(set.intersection(*vocabularies[:5])) == 0


def test_length_curriculum_grows_lengths_to_the_full_law():
    """Stream position k: the process's k-th example, its drawn length scaled by (k + 1) / ramp from min_len; from
    the ramp on, exactly the source's own example."""
    from longtrain.data.synthetic import LengthCurriculum

    src = SyntheticSource("associative_recall", min_len=100, max_len=4000, lengths="uniform", seed=3)
    curriculum = LengthCurriculum(src, ramp_docs=100, process_index=1, process_count=2)
    early = [len(curriculum(k).text) for k in range(10)]
    late = [curriculum(k).text for k in range(100, 110)]
    assert late == [src[1 + 2 * k].text for k in range(100, 110)]
    assert max(early) < 100 + 0.1 * 3900 + 12 < np.mean([len(t) for t in late])  # 12: one key=value pair
    mid = [len(curriculum(k).text) for k in range(40, 60)]
    assert np.mean(early) < np.mean(mid) < np.mean([len(t) for t in late])


@pytest.mark.parametrize("length", [300, 8000])
def test_associative_recall_answers_are_the_stored_values(length):
    doc = associative_recall(np.random.default_rng(1), length, "t", num_queries=5)
    context = doc.segments[0][0]
    pairs = dict(re.findall(r"([a-z]{4})=(\d{4})", context))
    queries = [(doc.segments[i][0].strip(" ="), doc.segments[i + 1][0]) for i in range(1, len(doc.segments), 3)]
    assert len(queries) == 5 and all(doc.segments[i + 1][1] == ANSWER for i in range(1, len(doc.segments), 3))
    for key, value in queries:
        assert pairs[key] == value
    assert abs(len(doc.text) - length) <= 12 or length < 400


def test_source_is_deterministic_and_follows_the_length_law():
    src = SyntheticSource("mixed", min_len=100, max_len=20_000, lengths="long_tail", seed=4)
    again = SyntheticSource("mixed", min_len=100, max_len=20_000, lengths="long_tail", seed=4)
    lengths = np.array([len(src[i].text) for i in range(300)])
    assert [src[i].text for i in range(5)] == [again[i].text for i in range(5)]
    assert {src[i].task for i in range(50)} == {"passkey", "associative_recall"}
    assert np.median(lengths) < 600 and lengths.max() > 5000  # most short, a few long
    with pytest.raises(ValueError, match="synthetic_task"):
        SyntheticSource("copying")


def _eval_batch(docs, T):
    from longtrain.data.packing import best_fit_rows, pack_rows

    return pack_rows(docs, best_fit_rows([len(d) for d in docs], T), T, answers=True)


def test_score_answers_against_a_direct_count():
    tok = Tokenize(ByteTokenizer(), False, True)
    src = SyntheticSource("mixed", min_len=150, max_len=250, seed=2)
    docs = [tok(src[i]) for i in range(8)]
    batch = _eval_batch(docs, 512)
    perfect = score_answers(batch["targets"], batch)
    assert perfect == {"token_accuracy": 1.0, "exact_match": 1.0, "num_answers": 8}
    # break one answer token of two documents: the oracle counts per document straight from the segments
    pred = batch["targets"].copy()
    rows, cols = np.nonzero(batch["answer_mask"])
    broken = set()
    for k in (0, len(rows) - 1):
        pred[rows[k], cols[k]] += 1
        broken.add((rows[k], batch["segment_ids"][rows[k], cols[k]]))
    got = score_answers(pred, batch)
    assert got["token_accuracy"] == pytest.approx(1 - 2 / len(rows))
    assert got["exact_match"] == pytest.approx(1 - len(broken) / 8)
    assert score_retrieval(pred, batch) == (8 - len(broken), 8)
    # the answer mask sits on the positions that predict the answer characters
    for r, c in zip(rows, cols):
        assert chr(batch["targets"][r, c]).isdigit()
    with pytest.raises(KeyError, match="answer_mask"):
        score_answers(pred, {k: v for k, v in batch.items() if k != "answer_mask"})
