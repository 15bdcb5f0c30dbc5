"""Training FLOPs, MFU against a per-device peak table, and the metric sinks (JSON-lines file, wandb).

FLOPs per step = 6 x (matmul parameters touched per token) x (target-bearing tokens)  +  attention FLOPs counted
per *document*: a causal document of length L costs L(L+1)/2 query-key pairs (fewer with a sliding window), not
the T^2/2 of the padded row it sits in. Lightning (linear) layers cost O(L d^2) per document instead.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import urllib.parse
import uuid
from typing import Any

import numpy as np

from longtrain.config import Config, ModelConfig

# Dense (no sparsity) bf16 peak FLOP/s per device. Matched against `jax.Device.device_kind`, lowercased, in order:
# more specific names first ("tpu v5 lite" is v5e and must not match v5p).
PEAK_FLOPS_BF16: list[tuple[str, str, float]] = [
    ("h200", "H200", 989e12),
    ("h100", "H100", 989e12),
    ("a100", "A100", 312e12),
    ("b200", "B200", 2250e12),
    ("tpu v6 lite", "TPU v6e", 918e12),
    ("tpu v6e", "TPU v6e", 918e12),
    ("tpu v5 lite", "TPU v5e", 197e12),
    ("tpu v5e", "TPU v5e", 197e12),
    ("tpu v5p", "TPU v5p", 459e12),
    ("tpu v5", "TPU v5p", 459e12),
    ("tpu v4", "TPU v4", 275e12),
]


def peak_flops_per_device(device_kind: str) -> tuple[str, float] | None:
    """(table name, peak FLOP/s) for a device kind, or None (CPU and unknown devices: MFU is n/a)."""
    kind = device_kind.lower()
    for needle, name, peak in PEAK_FLOPS_BF16:
        if needle in kind:
            return name, peak
    return None


def _layer_kinds(model: ModelConfig) -> list[str]:
    return list(model.layer_types) if model.layer_types else ["full_attention"] * model.num_layers


def matmul_params_per_token(model: ModelConfig) -> int:
    """Weights multiplied by each token in one forward pass: projections, active experts' MLPs and the LM head
    (the embedding lookup is a gather, not a matmul)."""
    e, d = model.hidden_size, model.resolved_head_dim
    attn = e * model.num_heads * d + 2 * e * model.num_kv_heads * d + model.num_heads * d * e
    mlp = 3 * e * model.intermediate_size * model.experts_per_token
    router = e * model.num_experts if model.num_experts > 1 else 0
    return model.num_layers * (attn + mlp + router) + e * model.vocab_size


def causal_pairs(lengths: np.ndarray, window: int | None) -> np.ndarray:
    """Query-key pairs a causal (optionally sliding-window) document of each length attends."""
    lengths = np.asarray(lengths, np.float64)
    full = lengths * (lengths + 1) / 2
    if window is None:
        return full
    w = float(window)
    return np.where(lengths <= w, full, w * (w + 1) / 2 + (lengths - w) * w)


def document_lengths(segment_ids_BT: np.ndarray) -> np.ndarray:
    """Length of every document in a batch: tokens per (row, segment id != 0). Works in any layout order."""
    lengths = []
    for row in np.asarray(segment_ids_BT):
        ids, counts = np.unique(row[row != 0], return_counts=True)
        lengths.append(counts)
    return np.concatenate(lengths) if lengths else np.zeros((0,), np.int64)


def train_flops(model: ModelConfig, segment_ids_BT: np.ndarray) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) on this batch."""
    return train_flops_of_lengths(model, document_lengths(segment_ids_BT))


def train_flops_of_lengths(model: ModelConfig, lengths) -> float:
    """Model FLOPs of one training step over documents of these token lengths (each attends causally to itself)."""
    lengths = np.asarray(lengths)
    tokens = float(lengths.sum())
    dense = 6.0 * matmul_params_per_token(model) * tokens
    kinds = _layer_kinds(model)
    n_softmax = sum(k == "full_attention" for k in kinds)
    n_linear = len(kinds) - n_softmax
    d = model.resolved_head_dim
    pairs = float(causal_pairs(lengths, model.sliding_window).sum())
    softmax = 3.0 * 4.0 * d * model.num_heads * pairs * n_softmax        # QK^T and PV, 2 flops per MAC each
    linear = 3.0 * 4.0 * d * d * model.num_heads * tokens * n_linear     # k v^T state update and q S readout
    return dense + softmax + linear


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:
        return None


class MetricsFile:
    """Appends one JSON object per line; lines are flushed so a killed run keeps everything logged so far.
    `keep_through_step`: a run that (re)starts at this step first drops the file's records of later steps (a
    killed run logged them, the resumed run replays them), so every step appears once."""

    def __init__(self, path: str, keep_through_step: int | None = None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        if keep_through_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                kept = [line for line, step in ((line, _step_of(line)) for line in f)
                        if step is not None and step <= keep_through_step]
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str, kind: str = "train") -> dict[int, dict]:
    """step -> the last record of that step of this kind (`"train"` or `"eval"`)."""
    out: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == kind:
                out[int(rec["step"])] = rec
    return out


def resolve_wandb_mode(mode: str) -> str:
    """'auto' -> WANDB_MODE from the environment if set, 'online' when an API key is configured, else 'offline'."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.expanduser("~/.netrc")
    if os.path.exists(netrc):
        with open(netrc, encoding="utf-8", errors="ignore") as f:
            if "api.wandb.ai" in f.read():
                return "online"
    return "offline"


def wandb_unreachable(base_url: str, timeout_s: float = 3.0) -> str | None:
    """None when the wandb server at `base_url` accepts a TCP connection within `timeout_s`, else the reason.
    wandb's own init waits up to 90 s and then raises; this answers in seconds."""
    parsed = urllib.parse.urlparse(base_url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return None
    except OSError as e:
        return f"{host}:{port} is unreachable ({e.strerror or e.__class__.__name__})"


class WandbSink:
    """wandb run in online/offline mode; a no-op when disabled. The run id is kept in the output folder so a
    resumed training continues the same run. Training never depends on wandb: when online mode cannot reach the
    server or cannot log in, the run logs offline (one warning; `wandb sync` uploads it later)."""

    INIT_TIMEOUT_S = 30.0

    def __init__(self, config: Config, config_dict: dict, warn=None):
        self.mode = resolve_wandb_mode(config.logging.wandb_mode)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        out = config.train.output_dir
        os.makedirs(out, exist_ok=True)
        id_file = os.path.join(out, "wandb_run_id")
        if os.path.exists(id_file):
            with open(id_file, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]
            with open(id_file, "w", encoding="utf-8") as f:
                f.write(run_id)
        settings = dict(console="off", quiet=True, silent=True, x_disable_stats=True, x_disable_meta=True,
                        init_timeout=self.INIT_TIMEOUT_S)

        def init(mode):
            return wandb.init(project=config.logging.wandb_project, name=config.logging.wandb_run_name, id=run_id,
                              resume="allow", dir=out, mode=mode, config=config_dict,
                              settings=wandb.Settings(**settings))

        offline_note = f"logging offline to {os.path.join(out, 'wandb')} (upload later with `wandb sync`)"
        why = wandb_unreachable(wandb.Settings().base_url) if self.mode == "online" else None
        if why is not None:
            warn(f"longtrain: wandb: {why}; {offline_note}")
            self.mode = "offline"
        try:
            self.run = init(self.mode)
        except Exception as e:  # noqa: BLE001 - a login or server failure must not stop training
            if self.mode != "online":
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            warn(f"longtrain: wandb: online init failed ({type(e).__name__}: {first[:200]}); {offline_note}")
            self.mode = "offline"
            self.run = init("offline")

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
