"""Every user-facing failure of `longtrain train` ends in one line that names the problem, exit code 2, and no
traceback (unless --debug); each case fails before compiling where it can be known then. The cases of issue 13's
list; a missing or too large tokenizer is in test_data_tokenizers.py, a corrupt checkpoint and a changed model on
resume in test_train_e2e.py and test_checkpoint_integrity.py.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--devices", "8", "train.steps=4", "optim.warmup_steps=1", "data.seq_len=64", "data.batch_size=4",
         "train.eval_every=0", "logging.wandb_mode=disabled", "logging.progress=plain", "checkpoint.every=2"]


def _train(tmp_path, *overrides, debug=False, env=None):
    cmd = [sys.executable, "-m", "longtrain", "train", os.path.join(REPO, "configs", "smoke_cpu.yaml"),
           f"train.output_dir={tmp_path / 'run'}", *SMALL, *overrides] + (["--debug"] if debug else [])
    full = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in full.items() if v is not None})


def _one_line_exit_2(r, kind, *named):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"longtrain: {kind} error: "), r.stderr[-3000:]
    for name in named:
        assert name in last, (name, last)
    assert "Compiling" not in r.stderr and "compiled the train step" not in r.stderr + r.stdout
    return last


def _jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r) + "\n")
    return str(path)


def test_empty_data_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    r = _train(tmp_path, "data.source=jsonl", f"data.paths=[{path}]")
    _one_line_exit_2(r, "data", str(path), "no records")


def test_wrong_text_field_means_no_usable_record(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"content": f"document {i} " * 20} for i in range(30)])
    r = _train(tmp_path, "data.source=jsonl", f"data.paths=[{path}]")
    _one_line_exit_2(r, "data", "no text field 'text'", "nothing usable")


def test_balance_mode_with_tensor_parallelism_is_refused_naming_the_key(tmp_path):
    r = _train(tmp_path, "data.balance.enabled=true", "mesh.data=-1", "mesh.context=1", "mesh.tensor=2")
    _one_line_exit_2(r, "config", "data.balance.enabled=true", "mesh.tensor=1", "got mesh.tensor=2")


def test_seq_len_beyond_max_position_embeddings_names_rope_scaling(tmp_path):
    r = _train(tmp_path, "data.seq_len=8192")
    _one_line_exit_2(r, "config", "data.seq_len=8192", "model.max_position_embeddings=4096", "model.rope_scaling")


def test_every_checkpoint_corrupt(tmp_path):
    r = _train(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    for step in ("2", "4"):
        (ckpts / step / "checksums" / "metadata").write_text("{not json")
    r = _train(tmp_path, "train.steps=6")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("longtrain: checkpoint error: no checkpoint in ") and "2 moved" in lines[-1]
    assert sum("is corrupt: checksums" in line for line in lines) == 2
    assert sorted(os.listdir(ckpts / "corrupt")) == ["2", "4"]


def test_debug_shows_the_traceback(tmp_path):
    r = _train(tmp_path, "data.seq_len=8192", debug=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_strict_data_stops_in_one_line_keeps_the_progress_and_resumes_when_relaxed(tmp_path):
    records = [{"text": f"record {i} " * 30} for i in range(120)]
    records[40] = "{broken\n"
    path = _jsonl(tmp_path / "d.jsonl", records)
    r = _train(tmp_path, "data.source=jsonl", f"data.paths=[{path}]", "data.strict=true", "train.steps=60",
               "checkpoint.every=100")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("longtrain: data error: bad record ") and "d.jsonl:41: malformed JSON" in last
    saved = int(last.split("training state saved at step ")[1].split(" ")[0])
    assert 0 < saved < 60
    r = _train(tmp_path, "data.source=jsonl", f"data.paths=[{path}]", "data.strict=false", "train.steps=60",
               "checkpoint.every=100", "logging.every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {saved} with changed settings: data.strict: True -> False" in r.stderr
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    after = [row for row in rows if row.get("kind") == "train" and row["step"] > saved]
    assert after[-1]["bad_records"] == 1 and after[-1]["bad_records_by_reason"] == {"malformed JSON": 1}
    assert "bad_records=1" in r.stdout
    assert "bad records skipped: 1 (malformed JSON: 1); first: " in r.stdout


def test_wandb_key_without_network_trains_offline(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _train(tmp_path, "logging.wandb_mode=auto",
               env={"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "WANDB_MODE": None})
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "wandb" in line]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "logging offline" in warnings[0], r.stderr
    assert os.listdir(tmp_path / "run" / "wandb")
