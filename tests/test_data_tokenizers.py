"""Tokenizers: byte-level, a `tokenizers` JSON file and a Hugging Face folder (built in tmp_path, no downloads),
compared with the libraries themselves; BOS/EOS handling in the loader."""
import dataclasses
import json

import numpy as np
import pytest

from longtrain.config import DataConfig
from longtrain.data import make_dataset
from longtrain.data.documents import Tokenize
from longtrain.data.sources import RawDoc
from longtrain.data.tokenizers import ByteTokenizer, HFTokenizer, JsonFileTokenizer, make_tokenizer

WORDS = ["hello", "world", "long", "context", "model", "the", "a", "of"]


def _word_level(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    return tok, path


def test_byte_tokenizer_round_trip_and_specials():
    tok = make_tokenizer("byte")
    text = "Grüße, 世界! \t end"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.bos_id not in ids and tok.eos_id not in ids
    with pytest.raises(ValueError, match="bos_token"):
        make_tokenizer("byte", bos_token="<s>")


def test_tokenizers_json_file_matches_the_library(tmp_path):
    lib, path = _word_level(tmp_path)
    tok = make_tokenizer(path, bos_token="<s>", eos_token="</s>")
    assert isinstance(tok, JsonFileTokenizer)
    rng = np.random.default_rng(0)
    for _ in range(5):
        text = " ".join(rng.choice(WORDS + ["unknownword"], 12))
        assert tok.encode(text) == lib.encode(text, add_special_tokens=False).ids
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    with pytest.raises(ValueError, match="data.eos_token='<eos>'"):
        make_tokenizer(path, eos_token="<eos>")


def test_hf_tokenizer_folder_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    lib, _ = _word_level(tmp_path)
    folder = tmp_path / "hf_tok"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=lib, bos_token="<s>", eos_token="</s>",
                                                unk_token="[UNK]")
    fast.save_pretrained(str(folder))
    tok = make_tokenizer(str(folder))
    assert isinstance(tok, HFTokenizer)
    oracle = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    text = "the long context model of the world"
    assert tok.encode(text) == oracle.encode(text, add_special_tokens=False)
    assert (tok.bos_id, tok.eos_id) == (oracle.bos_token_id, oracle.eos_token_id) == (1, 2)


def test_bad_tokenizer_specs_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer='nowhere'"):
        make_tokenizer("nowhere")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="tokenizers JSON"):
        make_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        make_tokenizer(str(tmp_path / "broken.json"))


def test_bos_eos_per_config(tmp_path):
    _, path = _word_level(tmp_path)
    doc = RawDoc("hello world", "x:1")
    both = Tokenize(make_tokenizer(path, bos_token="<s>", eos_token="</s>"), True, True)(doc)
    assert both.tokens.tolist() == [1, 3, 4, 2]
    assert both.targets.tolist() == [3, 4, 2, -1]
    neither = Tokenize(ByteTokenizer(), False, False)(doc)
    assert neither.tokens.tolist() == list(b"hello world")
    with pytest.raises(ValueError, match="data.add_bos=true.*data.bos_token"):
        Tokenize(make_tokenizer(path), True, False)


def test_loader_with_json_tokenizer_end_to_end(tmp_path):
    _, path = _word_level(tmp_path)
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": " ".join(WORDS[: 2 + i % 6])}) + "\n")
    cfg = DataConfig(source="jsonl", paths=[str(tmp_path / "c.jsonl")], tokenizer=path, bos_token="<s>",
                     eos_token="</s>", add_bos=True, seq_len=16, batch_size=2, prefetch=0)
    batch = next(make_dataset(cfg))
    toks, seg = batch["tokens"], batch["segment_ids"]
    starts = (seg > 0) & (batch["positions"] == 0)
    assert (toks[starts] == 1).all()  # every document starts with BOS
    last = (seg > 0) & (batch["loss_mask"] == 0)
    assert (toks[last] == 2).all()  # ... and ends with EOS, whose target is masked
    assert dataclasses.replace(cfg).tokenizer == path


def test_tokenizer_larger_than_the_model_vocabulary_stops_before_compiling(tmp_path):
    """A 1,000-token tokenizer with model.vocab_size=256 used to give NaN on every step; now `train` exits 2 with one
    line naming both sizes. A missing tokenizer path is one line and exit 2 too."""
    import os
    import subprocess
    import sys

    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(999)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "big.json")
    tok.save(path)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [sys.executable, "-m", "longtrain", "train", os.path.join(repo, "configs", "smoke_cpu.yaml"), "--devices",
            "8", f"train.output_dir={tmp_path / 'run'}", "logging.wandb_mode=disabled", "data.add_eos=false"]
    for extra, wanted in (([f"data.tokenizer={path}", "model.vocab_size=256"], ["1000 tokens", "model.vocab_size=256"]),
                          ([f"data.tokenizer={tmp_path / 'nope.json'}"], ["nope.json"])):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=180)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert all(w in r.stderr for w in wanted), r.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
