"""Document sources: JSON lines, text, Parquet, ArrayRecord, globs, mixtures; bad data counted or raised."""
import dataclasses
import json

import numpy as np
import pytest

from longtrain.config import DataConfig
from longtrain.data import make_dataset, sources
from longtrain.data.documents import BadDoc, document_dataset


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": 1}) + "\n")


def test_jsonl_source_reads_each_line_and_its_text_field(tmp_path):
    texts = ["first doc", "zweites Dokument \u00e4\u00f6\u00fc", "third\nwith a newline"]
    write_jsonl(tmp_path / "a.jsonl", texts, field="body")
    src = sources.JsonlSource(str(tmp_path / "a.jsonl"), text_field="body")
    assert len(src) == 3
    assert [src[i].text for i in range(3)] == texts
    assert src[1].origin.endswith("a.jsonl:2")


def test_jsonl_bad_records_are_flagged_with_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "good one"}\n')
        f.write(b'{"text": "broken\n')
        f.write(b'{"text": ""}\n')
        f.write(b'{"text": "caf\xe9 latin-1"}\n')
        f.write(b'{"other": "no text"}\n')
        f.write(b'{"text": "last good"}')  # no final newline
    src = sources.JsonlSource(str(p))
    got = [src[i] for i in range(len(src))]
    assert len(got) == 6
    assert [g.error is None for g in got] == [True, False, False, False, False, True]
    assert got[1].error.startswith("malformed JSON") and got[1].origin == f"{p}:2"
    assert got[2].error == "empty document"
    assert got[3].error.startswith("not UTF-8")
    assert "no text field" in got[4].error
    assert got[5].text == "last good"


def test_text_files_by_glob_one_document_each(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"text number {i} " * (i + 1))
    files = sources.expand_paths([str(tmp_path / "doc*.txt")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["doc0.txt", "doc1.txt", "doc2.txt"]
    src = sources.open_files(files, "text", "text")
    assert len(src) == 3 and src[2].text == "text number 2 " * 3


def test_parquet_source_rows_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i} " * (i % 5 + 1) for i in range(25)] + [None]
    table = pa.table({"content": texts, "n": list(range(26))})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)  # several row groups
    src = sources.ParquetSource(str(tmp_path / "t.parquet"), "content")
    assert len(src) == 26
    assert [src[i].text for i in (0, 8, 24)] == [texts[0], texts[8], texts[24]]
    assert src[25].error == "empty document" and src[25].origin.endswith("t.parquet:26")
    with pytest.raises(ValueError, match="'text'.*not a column"):
        sources.ParquetSource(str(tmp_path / "t.parquet"), "text")


def test_arrayrecord_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "d.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for rec in [b"alpha doc", b"\xff\xfe bad bytes", b"gamma doc"]:
        writer.write(rec)
    writer.close()
    src = sources.open_files([path], None, "text")
    assert len(src) == 3 and src[0].text == "alpha doc" and src[2].text == "gamma doc"
    assert src[1].error.startswith("not UTF-8") and src[1].origin == f"{path}:2"


def test_missing_file_or_empty_pattern_fails_at_start_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.expand_paths([str(tmp_path / "nope.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"matches no file"):
        sources.expand_paths([str(tmp_path / "*.jsonl")])
    cfg = DataConfig(source="jsonl", paths=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        make_dataset(cfg)
    with pytest.raises(ValueError, match="extension"):
        sources.kind_of("data.csv")


def _doc_text(doc):
    return bytes(doc.tokens.astype(np.uint8)).decode()


def test_weighted_mixture_follows_the_weights(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(50)])
    write_jsonl(tmp_path / "b.jsonl", [f"b{i}" for i in range(50)])
    cfg = DataConfig(source="mixture", paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
                     weights=[0.8, 0.2], add_eos=False)
    docs = document_dataset(cfg, seed=0)
    first = [_doc_text(docs[i])[0] for i in range(600)]
    frac_a = first.count("a") / len(first)
    assert abs(frac_a - 0.8) < 0.03
    # every document of a component comes once per epoch of that component
    a_docs = [t for t in (_doc_text(docs[i]) for i in range(200)) if t[0] == "a"]
    assert sorted(a_docs[:50], key=lambda s: int(s[1:])) == [f"a{i}" for i in range(50)]


def test_bad_data_is_skipped_counted_and_first_offender_reported(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"document {i} " * 3}) for i in range(30)]
    lines[4] = '{"text": oops}'
    lines[9] = json.dumps({"text": "   "})
    with open(p, "wb") as f:
        for i, line in enumerate(lines):
            f.write((b'{"text": "\xc3\x28 bad"}' if i == 17 else line.encode()) + b"\n")
    cfg = DataConfig(source="jsonl", paths=[str(p)], seq_len=64, batch_size=2, pack_window=4, prefetch=0)
    it = make_dataset(cfg)
    for _ in range(40):  # more than one epoch of the 30 records
        batch = next(it)
        assert batch["tokens"].shape == (2, 64)
    stats = it.stats()
    # oracle: the bad records among the documents consumed so far, read directly from the document dataset
    docs = document_dataset(cfg, seed=cfg.seed)
    stats = it.get_state()["bad"]  # exact as of the window start (the state a checkpoint restores)
    consumed = it.get_state()["window_start"]
    bad = [docs[i] for i in range(consumed) if isinstance(docs[i], BadDoc)]
    assert consumed > 30 and stats["skipped"] == len(bad) >= 3
    assert sum(stats["by_reason"].values()) == len(bad)
    assert set(stats["by_reason"]) == {"malformed JSON", "empty document", "not UTF-8"}
    first_line = int(stats["first_bad"].split(":")[1])
    assert first_line in (5, 10, 18) and stats["first_bad"].startswith(str(p))
    strict = dataclasses.replace(cfg, strict=True)
    it = make_dataset(strict)
    with pytest.raises(ValueError, match=rf"{p.name}:(5|10|18)"):
        for _ in range(40):
            next(it)


def test_too_long_documents_without_split_and_all_bad_corpus(tmp_path):
    p = tmp_path / "long.jsonl"
    write_jsonl(p, ["short one", "x" * 200, "another short"])
    cfg = DataConfig(source="jsonl", paths=[str(p)], seq_len=64, batch_size=1, split_long=False, prefetch=0)
    it = make_dataset(cfg)
    for _ in range(3):
        assert (next(it)["tokens"] != ord("x")).all()  # the long document never appears
    assert "too long (201 tokens > max_doc_len=64" in it.stats()["first_bad"]
    assert it.stats()["first_bad"].startswith(f"{p}:2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{also not}\n")
    with pytest.raises(ValueError, match="bad records in a row.*nothing usable"):
        next(make_dataset(dataclasses.replace(cfg, paths=[str(bad)])))
