"""The token-length index (balance mode): built once, checked against the config, its lengths pipeline item for item
equal to the documents pipeline, and with it each process reads only the documents placed on its own ranks while
getting exactly the rows of the single-process all-ranks loader."""
import dataclasses
import json
import logging
import os
import re

import numpy as np
import pytest
import yaml

from longtrain import cli
from longtrain.config import BalanceConfig, ConfigError, DataConfig
from longtrain.data import length_index, make_dataset
from longtrain.data.balance_loader import BalancedStepIterator
from longtrain.data.documents import BadDoc, document_dataset, make_tokenize, open_part, source_files
from longtrain.data.balance import schedule
from longtrain.data.length_index import DocLength, LengthIndex, build_index, lengths_dataset
from longtrain.data.packing import Document, docs_on_ranks, plan_to_batches
from test_data_pipeline import assert_resumes_to

KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
R, C = 8, 64


def _write_corpus(path, n, seed, bad=()):
    """A long-tailed JSON-lines corpus (some documents longer than a step's budget); `bad`: line numbers (0-based)
    written as malformed JSON / empty / non-UTF-8 records."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for i in range(n):
            if i in bad:
                f.write([b'{"text": oops}', json.dumps({"text": "  "}).encode(), b'{"text": "\xc3\x28"}'][i % 3])
            else:
                length = int(rng.choice([3, 10, 30, 80, 200, 700], p=[.25, .25, .2, .15, .1, .05]))
                text = f"<{path.name}:{i}>" + "".join(rng.choice(list("abcdefgh "), length))
                f.write(json.dumps({"text": text}).encode())
            f.write(b"\n")
    return str(path)


def _config(tmp_path, **kw):
    paths = [_write_corpus(tmp_path / "a.jsonl", 70, 0, bad=(4, 11, 30)), _write_corpus(tmp_path / "b.jsonl", 50, 1)]
    bal = BalanceConfig(enabled=True, capacity=C, fill=0.95, length_index=str(tmp_path / "idx"))
    cfg = DataConfig(source="jsonl", paths=paths, seq_len=C, balance=bal, prefetch=0)
    cfg = dataclasses.replace(cfg, **kw)
    build_index(cfg, cfg.balance.length_index)
    return cfg


def _records(cfg):
    """Oracle: each part's records tokenized directly (no index)."""
    tokenize = make_tokenize(cfg)
    return [[tokenize(src[i]) for i in range(len(src))] for src in (open_part(f, cfg) for f in source_files(cfg))]


def test_index_round_trip_and_cli(tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path, add_bos=True)
    index = LengthIndex.load(cfg.balance.length_index, cfg)
    want = _records(cfg)
    assert sum(isinstance(d, BadDoc) for d in want[0]) == 3
    for k, records in enumerate(want):
        part = index.part(k)
        assert len(part) == len(records)
        for i, doc in enumerate(records):
            got = part[i]
            if isinstance(doc, BadDoc):
                assert got == doc  # origin "file:line" and the reason, as reading the record says
            else:
                assert got == DocLength(len(doc), doc.origin)
    # the CLI writes the same index in 2 worker processes (small chunks, so they finish out of order), with
    # progress lines, and the override applies
    monkeypatch.setattr(length_index, "_CHUNK", 16)
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({"data": {"source": "jsonl", "paths": cfg.paths}}))
    out = tmp_path / "cli_idx"
    assert cli.main(["index-lengths", str(conf), "--out", str(out), "--progress-every", "0", "--workers", "2",
                     "data.add_bos=true"]) == 0
    captured = capsys.readouterr()
    assert f"{sum(map(len, want))} records" in captured.out and "3 bad record(s)" in captured.out
    assert re.search(r"indexed \d+/120 records \(\d+\.\d%\), .* records/s", captured.err)
    np.testing.assert_array_equal(np.load(out / "lengths.npy"), index.lengths)
    assert json.loads((out / "meta.json").read_text())["bad"] == index.meta["bad"]
    assert cli.main(["index-lengths", str(conf), "--out", str(out), "data.source=synthetic"]) == 2


def test_index_mismatch_errors_name_the_key_or_file(tmp_path):
    cfg = _config(tmp_path)
    where = cfg.balance.length_index
    for change, message in [({"add_eos": False}, "built with data.add_eos=true, config has false"),
                            ({"add_bos": True}, "built with data.add_bos=false, config has true"),
                            ({"text_field": "body"}, "built with data.text_field=text, config has body"),
                            ({"source": "mixture"}, "built with data.source=jsonl, config has mixture"),
                            ({"paths": cfg.paths[:1]}, "b.jsonl is in the index but not in data.paths"),
                            ({"paths": cfg.paths[::-1]}, "another order")]:
        with pytest.raises(ValueError, match=message):
            LengthIndex.load(where, dataclasses.replace(cfg, **change))
    extra = _write_corpus(tmp_path / "c.jsonl", 5, 2)
    with pytest.raises(ValueError, match="c.jsonl .data.paths. is not in the index"):
        LengthIndex.load(where, dataclasses.replace(cfg, paths=cfg.paths + [extra]))
    with pytest.raises(ValueError, match="synthetic has no files"):
        LengthIndex.load(where, dataclasses.replace(cfg, source="synthetic"))
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        LengthIndex.load(str(tmp_path), cfg)
    # unreadable index files are config errors naming the file (exit 2), not tracebacks
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(where, broken)
    (broken / "lengths.npy").write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match=r"cannot read .*lengths.npy"):
        LengthIndex.load(str(broken), cfg)
    (broken / "meta.json").write_text("{ half")
    with pytest.raises(ConfigError, match=r"cannot read .*meta.json"):
        LengthIndex.load(str(broken), cfg)
    # a file touched (mtime) or grown (size) since the build
    st = os.stat(cfg.paths[1])
    os.utime(cfg.paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"file .*b.jsonl changed since the length index"):
        LengthIndex.load(where, cfg)
    with open(cfg.paths[0], "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(ValueError, match=r"file .*a.jsonl changed since.*size"):
        LengthIndex.load(where, cfg)


def test_index_that_lies_is_caught_when_a_document_is_read(tmp_path):
    """Same size and mtime but other content (a good record turned malformed): reading it fails, naming it."""
    cfg = _config(tmp_path)
    path = cfg.paths[0]
    st = os.stat(path)
    lines = open(path, "rb").read().split(b"\n")
    lines = [b"{" * len(line) if line.startswith(b'{"text": "<') else line for line in lines]
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    it = make_dataset(cfg, num_ranks=R)
    with pytest.raises(ValueError, match=r"a.jsonl:\d+: the length index says \d+, reading it gives malformed"):
        next(it)
    it.close()


@pytest.mark.parametrize("mixture", [False, True])
def test_lengths_pipeline_equals_documents_pipeline(tmp_path, mixture):
    kw = dict(source="mixture", weights=[0.7, 0.3]) if mixture else {}
    cfg = _config(tmp_path, **kw)
    index = LengthIndex.load(cfg.balance.length_index, cfg)
    for pi, pc in [(0, 1), (1, 2)]:
        docs = document_dataset(cfg, seed=7, process_index=pi, process_count=pc)
        lengths = lengths_dataset(cfg, index, seed=7, process_index=pi, process_count=pc)
        assert lengths.epoch_length == docs.epoch_length
        for i in range(300):  # more than an epoch of every part and share
            doc, got = docs[i], lengths[i]
            assert got == (doc if isinstance(doc, BadDoc) else DocLength(len(doc), doc.origin)), i
    # the oracle is not trivially satisfied: other seeds give other streams
    other = lengths_dataset(cfg, index, seed=8)
    assert [other[i] for i in range(50)] != [lengths_dataset(cfg, index, seed=7)[i] for i in range(50)]


@pytest.mark.parametrize("method", ["balanced", "static", "best_fit"])
def test_plan_to_batches_for_a_rank_range_equals_those_rows_of_all_ranks(method):
    rng = np.random.default_rng(3)
    lengths = np.minimum(rng.pareto(1.2, 60).astype(np.int64) * 40 + 5, 6 * C)
    docs = [Document.from_tokens(rng.integers(0, 500, n)) for n in lengths]
    plan = schedule(lengths, R, C, method)
    assert max(plan.context_degrees) > 1  # split documents: their segment ids span several ranks
    full = plan_to_batches(plan, docs)
    for lo in range(0, R, 2):
        ranks = range(lo, lo + 2)
        only = {d: docs[d] for d in docs_on_ranks(plan, ranks)}  # any other document read would be a KeyError
        assert len(only) < len(docs) or method == "static"  # static shards every document over its row's ranks
        for got, want in zip(plan_to_batches(plan, only, ranks=ranks), full):
            assert got["context"] == want["context"] and got["split_region"] == want["split_region"]
            for k in KEYS:
                np.testing.assert_array_equal(got[k], want[k][lo:lo + 2])
    with pytest.raises(ValueError, match="ranks="):
        plan_to_batches(plan, docs, ranks=range(R - 1, R + 1))


class _CountingDocs:
    """The document stream, recording which indices were read (each read tokenizes the record)."""

    def __init__(self, docs):
        self.docs, self.read, self.epoch_length = docs, [], docs.epoch_length

    def __getitem__(self, i):
        self.read.append(i)
        return self.docs[i]


def _iterator(cfg, docs, lengths=None, *, pi=0, pc=1):
    return BalancedStepIterator(docs, cfg.balance, num_ranks=R, capacity=C, process_index=pi, process_count=pc,
                                split_long=True, strict=False, lengths=lengths)


def _segments(micro):
    """(tokens, positions) of every document piece in the rows of a step."""
    out = []
    for mb in micro:
        for r in range(mb["tokens"].shape[0]):
            for s in set(mb["segment_ids"][r].tolist()) - {0}:
                where = mb["segment_ids"][r] == s
                out.append((mb["tokens"][r, where], mb["positions"][r, where]))
    return out


def test_two_processes_read_only_their_ranks_documents_and_get_the_all_ranks_rows(tmp_path):
    cfg = _config(tmp_path)
    index = LengthIndex.load(cfg.balance.length_index, cfg)
    steps = 6
    all_docs = _CountingDocs(document_dataset(cfg, seed=0))
    oracle = _iterator(cfg, all_docs)  # one process, all ranks, no index: tokenizes every document it meets
    want = [next(oracle) for _ in range(steps)]
    assert any(mb["context"] > 1 for s in want for mb in s["micro_batches"])  # long documents were split
    plain = document_dataset(cfg, seed=0)
    read = []
    for pi in range(2):
        docs = _CountingDocs(document_dataset(cfg, seed=0))
        it = _iterator(cfg, docs, lengths_dataset(cfg, index, seed=0), pi=pi, pc=2)
        rows = slice(pi * R // 2, (pi + 1) * R // 2)
        mine = []
        for w in want:
            got = next(it)
            mine += _segments(got["micro_batches"])
            assert got["num_targets"] == w["num_targets"] and got["num_tokens"] == w["num_tokens"]
            assert got["plan"].context_degrees == w["plan"].context_degrees
            for g, x in zip(got["micro_batches"], w["micro_batches"]):
                assert g["context"] == x["context"] and g["split_region"] == x["split_region"]
                for k in KEYS:
                    np.testing.assert_array_equal(g[k], x[k][rows])
        # every document this process read has a piece in its rows (it read nothing for the other ranks)
        for i in set(docs.read):
            doc = plain[i]
            served = any(pos[-1] < len(doc) and np.array_equal(doc.tokens[pos], tok) for tok, pos in mine)
            assert served, f"document {i} was read but has no piece on ranks {rows}"
        read.append(set(docs.read))
    assert read[0] | read[1] <= set(all_docs.read)
    assert all(len(r) < len(read[0] | read[1]) for r in read)  # each read strictly fewer than the step documents


def test_resume_with_an_index_gives_identical_next_steps(tmp_path):
    cfg = _config(tmp_path, prefetch=2)
    it = make_dataset(cfg, num_ranks=R, seed=3, process_index=1, process_count=2)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["pending"], "the saved state should hold deferred pieces (the harder case)"
    more = [next(it) for _ in range(3)]
    it.close()
    assert_resumes_to(make_dataset(cfg, num_ranks=R, seed=3, process_index=1, process_count=2), state, more)


def test_bad_records_from_the_index_are_counted_like_reading_them(tmp_path):
    cfg = _config(tmp_path)
    index = LengthIndex.load(cfg.balance.length_index, cfg)
    with_index = _iterator(cfg, document_dataset(cfg, seed=0), lengths_dataset(cfg, index, seed=0), pi=0, pc=2)
    without = _iterator(cfg, document_dataset(cfg, seed=0))
    for _ in range(25):  # a few epochs of the 120 records
        next(with_index), next(without)
    stats = with_index.stats()
    assert stats == without.stats()
    assert stats["skipped"] >= 3 and set(stats["by_reason"]) == {"malformed JSON", "empty document", "not UTF-8"}
    assert stats["first_bad"].split(":")[0] == cfg.paths[0] and int(stats["first_bad"].split(":")[1]) in (5, 12, 31)
    strict = dataclasses.replace(cfg, strict=True)
    it = make_dataset(strict, num_ranks=R, process_index=1, process_count=2)
    with pytest.raises(ValueError, match=r"a.jsonl:(5|12|31): .*data.strict=true"):
        for _ in range(25):
            next(it)
    it.close()


def test_multi_process_file_source_without_index_warns_once(tmp_path, caplog):
    cfg = _config(tmp_path)
    no_index = dataclasses.replace(cfg, balance=dataclasses.replace(cfg.balance, length_index=None))
    with caplog.at_level(logging.WARNING, logger="longtrain.data.pipeline"):
        make_dataset(no_index, num_ranks=R).close()  # one process: nothing to save, no warning
        make_dataset(DataConfig(balance=no_index.balance, seq_len=C), num_ranks=R, process_count=2).close()
        assert not [r for r in caplog.records if r.name == "longtrain.data.pipeline"]
        it = make_dataset(no_index, num_ranks=R, process_index=0, process_count=2)
        next(it), next(it)
        it.close()
    warned = [r.getMessage() for r in caplog.records if r.name == "longtrain.data.pipeline"]
    assert len(warned) == 1  # at start-up, not per step
    assert "data.balance.length_index" in warned[0] and "longtrain index-lengths" in warned[0]
