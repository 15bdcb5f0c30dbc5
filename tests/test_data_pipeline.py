"""Packing invariants, resumable state, per-process shares and determinism of the grain loader; balance mode."""
import dataclasses
import json

import numpy as np
import pytest

from longtrain.config import BalanceConfig, ConfigError, DataConfig
from longtrain.data import make_dataset, make_eval_dataset
from longtrain.data.documents import document_dataset
from longtrain.data.packing import Document, best_fit_rows, pack_rows
from longtrain.data.pipeline import PackedIterator

KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def rebuild_documents(batch):
    """Per row and segment: (tokens, targets, loss_mask) in position order, checking positions restart at 0."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        ids = [s for s in np.unique(seg) if s != 0]
        assert ids == list(range(1, len(ids) + 1)), "segment ids are 1..n in the row"
        used = np.flatnonzero(seg)
        assert used.size == 0 or (used == np.arange(used.size)).all(), "padding only at the end of a row"
        for s in ids:
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all(), "a document is contiguous in its row"
            np.testing.assert_array_equal(batch["positions"][r, where], np.arange(where.size))
            out.append((batch["tokens"][r, where], batch["targets"][r, where], batch["loss_mask"][r, where]))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_best_fit_packing_invariants_on_random_documents(seed):
    rng = np.random.default_rng(seed)
    T = 128
    docs = [Document.from_tokens(rng.integers(4, 500, int(n))) for n in rng.integers(1, T + 1, 60)]
    rows = best_fit_rows([len(d) for d in docs], T)
    assert sorted(i for row in rows for i in row) == list(range(len(docs)))  # each document exactly once
    assert all(sum(len(docs[i]) for i in row) <= T for row in rows)
    # best fit decreasing never uses more rows than first fit in arrival order would
    assert len(rows) <= _first_fit_rows([len(d) for d in docs], T)
    batch = pack_rows(docs, rows, T)
    got = rebuild_documents(batch)
    assert len(got) == len(docs)
    want = {tuple(d.tokens.tolist()) for d in docs}
    assert {tuple(t.tolist()) for t, _, _ in got} == want
    for tokens, targets, mask in got:
        np.testing.assert_array_equal(targets[:-1], tokens[1:])  # next token within the document
        assert mask[-1] == 0 and (mask[:-1] == 1).all()


def _first_fit_rows(lengths, T):
    room = []
    for n in lengths:
        for k, r in enumerate(room):
            if r >= n:
                room[k] -= n
                break
        else:
            room.append(T - n)
    return len(room)


def _corpus(tmp_path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp_path / "corpus.jsonl"
    texts = []
    with open(path, "w") as f:
        for i in range(n):
            length = int(rng.choice([5, 20, 60, 150, 400]))
            text = f"<{i}>" + "".join(rng.choice(list("abcdefgh "), length))
            texts.append(text)
            f.write(json.dumps({"text": text}) + "\n")
    return str(path), texts


def test_loader_packs_every_document_once_and_splits_long_ones(tmp_path):
    path, texts = _corpus(tmp_path)
    cfg = DataConfig(source="jsonl", paths=[path], seq_len=64, batch_size=4, pack_window=4, prefetch=0,
                     add_eos=True)
    docs = document_dataset(cfg, seed=0)
    # one row per `next`, so the state is seen at every window boundary
    it = PackedIterator(docs, seq_len=64, rows_per_batch=1, window_rows=4, max_doc_len=64, split_long=True,
                        strict=False)
    pieces = []
    while True:
        pieces += rebuild_documents(next(it))
        state = it.get_state()
        if state["rows_done"] == 0 and state["window_start"] >= len(texts):  # a bit more than one epoch
            break
    expect = [docs[i] for i in range(state["window_start"])]
    got_tokens = sorted(tuple(t.tolist()) for t, _, _ in pieces)
    want_tokens = sorted(tuple(d.tokens[i:i + 64].tolist()) for d in expect for i in range(0, len(d), 64))
    assert got_tokens == want_tokens  # no token lost or duplicated
    assert max(len(d) for d in expect) > 64  # long documents did occur and were split
    # a cut keeps the next token as the piece's last target: only the true document ends are unmasked
    assert sum(int(m.sum()) for _, _, m in pieces) == sum(len(d) - 1 for d in expect)
    batch = next(make_dataset(cfg))
    assert all(batch[k].shape == (4, 64) for k in KEYS)


def test_resume_gives_identical_next_batches(tmp_path):
    path, _ = _corpus(tmp_path)
    cfg = DataConfig(source="jsonl", paths=[path], seq_len=64, batch_size=4, pack_window=6, prefetch=3)
    it = make_dataset(cfg, seed=5)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # it survives a JSON round trip (checkpoint)
    expected = [next(it) for _ in range(5)]
    it.close()
    fresh = make_dataset(cfg, seed=5)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    fresh.close()


def test_deterministic_for_a_seed_and_different_across_seeds():
    cfg = DataConfig(seq_len=128, batch_size=2, prefetch=0)
    a = [next(make_dataset(cfg, seed=1))["tokens"] for _ in range(2)]
    b = make_dataset(cfg, seed=2)
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.array_equal(a[0], next(b)["tokens"])


def test_each_process_reads_only_its_share(tmp_path):
    path, texts = _corpus(tmp_path, n=40)
    cfg = DataConfig(source="jsonl", paths=[path], seq_len=512, batch_size=4, prefetch=0)
    seen = []
    for pi in range(2):
        docs = document_dataset(cfg, seed=0, process_index=pi, process_count=2)
        seen.append({bytes(docs[i].tokens[:-1].astype(np.uint8)).decode() for i in range(20)})  # one epoch
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(texts)
    batch = next(make_dataset(cfg, process_index=1, process_count=2))
    assert batch["tokens"].shape == (2, 512)  # global batch 4 over 2 processes
    with pytest.raises(ValueError, match="process_count"):
        make_dataset(dataclasses.replace(cfg, batch_size=3), process_index=0, process_count=2)


def test_balance_mode_steps_plans_and_resume():
    bal = BalanceConfig(enabled=True, capacity=256, fill=0.95)
    cfg = DataConfig(seq_len=256, synthetic_lengths="long_tail", synthetic_min_len=40, synthetic_max_len=3000,
                     balance=bal, prefetch=2)
    it = make_dataset(cfg, num_ranks=8, seed=3)
    steps = [next(it) for _ in range(3)]
    state = it.get_state()
    more = [next(it) for _ in range(2)]
    it.close()
    for step in steps + more:
        plan = step["plan"]
        assert step["num_tokens"] <= 0.95 * 8 * 256
        assert step["num_targets"] == sum(float(mb["loss_mask"].sum()) for mb in step["micro_batches"])
        for mb, pmb in zip(step["micro_batches"], plan.micro_batches):
            assert mb["tokens"].shape == (8, 256) and mb["context"] == pmb.context
    assert any(mb.context > 1 for s in steps + more for mb in s["plan"].micro_batches)  # long docs got split
    assert_resumes_to(make_dataset(cfg, num_ranks=8, seed=3), state, more)
    # another device count cuts documents at another length: the saved pieces would not carry over
    with pytest.raises(ConfigError, match="data.balance.max_doc_len="):
        make_dataset(cfg, num_ranks=4, seed=3).set_state(state)
    # two processes: each gets its half of the ranks, together the whole step
    halves = [next(make_dataset(cfg, num_ranks=8, seed=3, process_index=p, process_count=2)) for p in range(2)]
    whole = steps[0]["micro_batches"][0]["tokens"]
    np.testing.assert_array_equal(np.concatenate([h["micro_batches"][0]["tokens"] for h in halves]), whole)
    with pytest.raises(ValueError, match="num_ranks"):
        make_dataset(cfg)


def test_eval_batches_are_fixed_and_carry_answer_masks():
    cfg = DataConfig(seq_len=256, batch_size=2)
    a, b = make_eval_dataset(cfg), make_eval_dataset(cfg)
    for _ in range(2):
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        assert x["answer_mask"].sum() > 0 and (x["loss_mask"][x["answer_mask"] > 0] == 1).all()
    train = next(make_dataset(cfg))
    assert not np.array_equal(train["tokens"], x["tokens"])  # eval uses another stream than training


def test_answer_weight_scales_the_loss_mask_of_answer_and_copy_targets_only():
    """Training batches with synthetic_answer_weight=w: loss_mask is w where the target is an answer token or the
    key's second spelling in the needle (read with the digits themselves), 1 elsewhere on targets."""
    from longtrain.data.tokenizers import ByteTokenizer

    plain_cfg = DataConfig(seq_len=256, batch_size=4, synthetic_task="passkey")
    weighted = next(make_dataset(dataclasses.replace(plain_cfg, synthetic_answer_weight=7.5)))
    plain = next(make_dataset(plain_cfg))
    assert "answer_mask" not in weighted and "answer_mask" not in plain
    for key in ("tokens", "targets", "segment_ids", "positions"):
        np.testing.assert_array_equal(weighted[key], plain[key])
    upweighted = weighted["loss_mask"] == 7.5
    np.testing.assert_array_equal(weighted["loss_mask"][~upweighted], plain["loss_mask"][~upweighted])
    assert (plain["loss_mask"][upweighted] == 1).all()
    # oracle: each document's answer is the 5 digits after its question "The pass key is "
    text = ByteTokenizer().decode
    for r in range(weighted["tokens"].shape[0]):
        for s_id in np.unique(weighted["segment_ids"][r][weighted["segment_ids"][r] > 0]):
            where = np.flatnonzero(weighted["segment_ids"][r] == s_id)
            doc = text(weighted["tokens"][r, where].tolist())
            q = doc.rfind("The pass key is ") + len("The pass key is ")
            if doc.startswith("There is a pass key") and q + 5 < len(doc):  # a whole document in this row
                copy = doc.index(" is the pass key. ") - 5
                want = np.zeros(where.size, bool)
                want[q - 1:q + 4] = True  # positions whose next token is one of the 5 digits of the answer
                want[copy - 1:copy + 4] = True  # ... or of the key's copy in the needle
                assert doc[copy:copy + 5] == doc[q:q + 5]
                np.testing.assert_array_equal(upweighted[r, where], want)
    assert upweighted.sum() >= 5


def assert_resumes_to(again, state: dict, want_steps: list) -> None:
    """`again` restored from `state` yields exactly `want_steps` (balance mode: plans and every array)."""
    again.set_state(state)
    for want in want_steps:
        got = next(again)
        assert got["plan"].context_degrees == want["plan"].context_degrees
        for g, w in zip(got["micro_batches"], want["micro_batches"]):
            for k in KEYS:
                np.testing.assert_array_equal(g[k], w[k])
    again.close()
