"""The typed configuration tree.

Every knob of longtrain lives here exactly once. Sections are frozen-free dataclasses so that tests and tools can
build configs in code; `longtrain.config.loader` reads them from YAML with dotted overrides and validates them.

Field constraints are declared next to the field with `knob(...)`: `ge`/`gt`/`le` bounds for numbers, and
`Literal[...]` types for closed sets of choices. Cross-field rules live in `loader.check_cross_fields`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

Dtype = Literal["float32", "bfloat16", "float16", "float64"]


def knob(default=dataclasses.MISSING, *, factory=None, ge=None, gt=None, le=None, help: str = ""):
    """A dataclass field with optional numeric bounds, read by the validator."""
    metadata = {"ge": ge, "gt": gt, "le": le, "help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class RopeScalingConfig:
    """RoPE scaling for long context, with the field names of Hugging Face `rope_scaling`."""

    type: Literal["none", "linear", "dynamic", "yarn", "llama3"] = "none"
    factor: float = knob(1.0, gt=0)
    original_max_position_embeddings: int | None = knob(None, gt=0)
    # llama3
    low_freq_factor: float = knob(1.0, gt=0)
    high_freq_factor: float = knob(4.0, gt=0)
    # yarn
    beta_fast: float = knob(32.0, gt=0)
    beta_slow: float = knob(1.0, gt=0)
    attention_factor: float | None = knob(None, gt=0)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass
class ModelConfig:
    """Decoder architecture. Names follow Hugging Face config.json where one exists."""

    architecture: Literal["llama", "mistral", "qwen2", "qwen3", "minimax"] = "llama"
    vocab_size: int = knob(256, ge=1)
    hidden_size: int = knob(64, ge=1)
    intermediate_size: int = knob(128, ge=1)
    num_layers: int = knob(2, ge=1)
    num_heads: int = knob(4, ge=1)
    num_kv_heads: int = knob(2, ge=1)
    head_dim: int | None = knob(None, ge=1, help="defaults to hidden_size // num_heads")
    max_position_embeddings: int = knob(131072, ge=1)
    rope_theta: float = knob(10000.0, gt=0)
    rope_scaling: RopeScalingConfig = knob(factory=RopeScalingConfig)
    partial_rotary_factor: float = knob(1.0, gt=0, le=1)
    rms_norm_eps: float = knob(1e-6, gt=0)
    tie_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = knob(None, ge=1)
    # MiniMax-style hybrid: one entry per layer, "full_attention" (softmax) or "linear_attention" (lightning).
    layer_types: list[str] | None = None
    lightning_block_size: int = knob(64, ge=1)
    num_experts: int = knob(1, ge=1)
    experts_per_token: int = knob(1, ge=1)
    moe_impl: Literal["dense", "ragged"] = knob(
        "ragged", help="MoE MLP: 'ragged' sorted dispatch (sparse FLOPs) or 'dense' all-experts einsum (tests)")
    router_aux_loss_coef: float = knob(0.001, ge=0, help="MoE load-balancing loss weight (HF router_aux_loss_coef)")
    # MiniMax residual factors (HF names): out = alpha * normed_input + beta * sublayer(normed_input)
    full_attn_alpha_factor: float = 1.0
    full_attn_beta_factor: float = 1.0
    linear_attn_alpha_factor: float = 1.0
    linear_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = 1.0
    mlp_beta_factor: float = 1.0
    lightning_norm_eps: float = knob(1e-6, gt=0, help="eps of the RMSNorm over all heads after lightning attention")
    # compute
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"
    attention_impl: Literal["auto", "reference", "xla", "pallas", "cudnn"] = "auto"
    lightning_impl: Literal["auto", "reference", "scan", "xla", "pallas"] = "auto"
    scan_layers: bool = False
    remat: Literal["none", "full", "save_dots", "save_attention_output"] = "none"
    init_std: float = knob(0.02, gt=0)
    # special token ids, kept from an imported Hugging Face config so that export writes them back
    bos_token_id: int | None = None
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None

    def __hash__(self) -> int:
        # an NNX module keeps its config as static data, so its graphdef is hashable only if the config is
        # (`jax.jit(..., static_argnums=...)` on a graphdef, jit caches); equal configs have equal reprs
        return hash(repr(self))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclasses.dataclass
class MeshConfig:
    """Device mesh and context parallelism. `-1` on one axis fills the remaining devices."""

    data: int = knob(-1, ge=-1)
    fsdp: int = knob(1, ge=-1)
    context: int = knob(1, ge=-1)
    tensor: int = knob(1, ge=-1)
    context_strategy: Literal["auto", "ring", "token_ring", "all_gather", "ulysses", "ulysses_ring"] = "auto"
    layout: Literal["contiguous", "zigzag", "striped"] = "zigzag"
    ulysses_degree: int | None = knob(None, ge=1, help="inner Ulysses degree of the ulysses_ring hybrid")
    lightning_variant: Literal["all_gather", "ring"] = "all_gather"  # state passing of lightning layers over context


@dataclasses.dataclass
class BalanceConfig:
    """Variable-length balance scheduler (hybrid data/context parallelism per step)."""

    enabled: bool = False
    method: Literal["balanced", "static", "first_fit", "best_fit"] = "balanced"
    capacity: int | None = knob(None, ge=1, help="tokens per rank; defaults to data.seq_len")
    attention_coef: float = knob(1.0, ge=0)
    linear_coef: float = knob(4096.0, ge=0)
    comm_coef: float = knob(512.0, ge=0)
    comm_overlap: bool = knob(True, help="ring traffic hides behind attention compute (time = max, not sum)")
    region_quantum: int | None = knob(None, ge=1, help="smallest split region, tokens; defaults to capacity // 64")
    max_doc_len: int | None = knob(None, ge=1, help="longer documents are cut; defaults to the step budget "
                                                    "fill * num_ranks * capacity")
    fill: float = knob(0.98, gt=0, le=1, help="the loader fills each step to this fraction of ranks x capacity")
    max_shapes: int = knob(8, ge=1, help="distinct (c, split region) programs per run (method=balanced)")
    length_index: str | None = knob(None, help="token-length index folder (`longtrain index-lengths`): each "
                                               "process then reads only the documents on its ranks")


@dataclasses.dataclass
class DataConfig:
    source: Literal["synthetic", "jsonl", "text", "parquet", "arrayrecord", "mixture"] = "synthetic"
    paths: list[str] = knob(factory=list, help="files or glob patterns")
    weights: list[float] | None = None
    text_field: str = "text"
    tokenizer: str = knob("byte", help="'byte', a tokenizers JSON file, or a Hugging Face tokenizer folder")
    add_bos: bool = False
    add_eos: bool = True
    seq_len: int = knob(256, ge=1)
    batch_size: int = knob(8, ge=1, help="global rows per step")
    split_long: bool = True
    strict: bool = False
    seed: int = 0
    prefetch: int = knob(2, ge=0)
    synthetic_task: Literal["passkey", "associative_recall", "mixed"] = "mixed"
    synthetic_lengths: Literal["fixed", "uniform", "long_tail"] = knob(
        "uniform", help="length law of synthetic examples, in [synthetic_min_len, synthetic_max_len]")
    synthetic_min_len: int = knob(64, ge=1)
    synthetic_max_len: int | None = knob(None, ge=1, help="defaults to seq_len")
    synthetic_needle_depth: list[float] = knob(
        factory=lambda: [0.0, 1.0], help="passkey: where the key may lie, as fractions [from, to] of the filler "
                                         "(0: at the start, 1: just before the question)")
    synthetic_filler: Literal["repeated", "random_words"] = knob(
        "repeated", help="passkey filler: the classic repeated sentence, or words of a random per-document "
                         "vocabulary (predictable only by copying from context, which teaches retrieval)")
    synthetic_curriculum_docs: int = knob(
        0, ge=0, help="length curriculum: over this many training examples (per process) synthetic lengths grow "
                      "from synthetic_min_len to the full law; 0 = off. Eval always uses the full length")
    synthetic_answer_weight: float = knob(
        1.0, ge=0, help="training loss weight of the synthetic task's answer tokens and of the passkey's second "
                        "spelling in the needle (predictable only by copying); the loss is the weighted mean over "
                        "targets, eval is unweighted. Answers are a few tokens among many predictable ones: "
                        "weighting them, as associative-recall studies train on answers, makes retrieval learnable")
    bos_token: str | None = knob(None, help="BOS token string (tokenizers JSON / HF folder); HF default otherwise")
    eos_token: str | None = knob(None, help="EOS token string (tokenizers JSON / HF folder); HF default otherwise")
    max_doc_len: int | None = knob(None, ge=1, help="split_long cuts documents to this; defaults to seq_len")
    pack_window: int = knob(16, ge=1, help="rows packed best-fit together (per process)")
    eval_paths: list[str] = knob(factory=list)
    balance: BalanceConfig = knob(factory=BalanceConfig)


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = knob(3e-4, ge=0)
    warmup_steps: int = knob(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = knob(0.1, ge=0, le=1)
    weight_decay: float = knob(0.1, ge=0)
    b1: float = knob(0.9, ge=0, le=1)
    b2: float = knob(0.95, ge=0, le=1)
    eps: float = knob(1e-8, gt=0)
    grad_clip: float | None = knob(1.0, gt=0)
    grad_accum: int = knob(1, ge=1)
    z_loss: float = knob(0.0, ge=0)
    mode: Literal["full", "seco", "spaco"] = "full"
    chunk_size: int = knob(1024, ge=1)
    spaco_keep_prob: float = knob(0.5, gt=0, le=1)
    seco_offload: Literal["none", "host"] = "none"  # seco/spaco: K/V buffers + accumulator in host memory
    # seco/spaco with mesh.context > 1: parameters ZeRO-3 inside the chunk loop (gathered per layer, gradient
    # reduce-scattered per chunk) or replicated (gathered once, gradient reduced once per step)
    seco_params: Literal["zero3", "replicated"] = "zero3"


@dataclasses.dataclass
class TrainConfig:
    steps: int = knob(100, ge=1)
    seed: int = 0
    eval_every: int = knob(0, ge=0, help="0 disables eval")
    eval_batches: int = knob(2, ge=1)
    max_nonfinite_steps: int = knob(5, ge=1, help="stop after this many skipped NaN/inf steps in a row")
    profile_steps: list[int] | None = None
    output_dir: str = "runs/default"
    export_hf: bool = False
    export_dir: str | None = knob(None, help="HF export folder; defaults to <train.output_dir>/hf")
    init_from: str | None = knob(
        None, help="fine-tune from these weights: a `longtrain import` folder (config.yaml + params/) or a Hugging "
                   "Face model folder (config.json); model.* must describe the same model")
    inject_nan_steps: list[int] | None = knob(
        None, help="fault injection for tests: feed these (0-based) steps a NaN batch (loss_mask = NaN)")


@dataclasses.dataclass
class CheckpointConfig:
    enabled: bool = True
    dir: str | None = knob(None, help="defaults to <train.output_dir>/checkpoints")
    every: int = knob(100, ge=1)
    keep: int = knob(3, ge=1)
    async_save: bool = True
    resume: bool = True


@dataclasses.dataclass
class LoggingConfig:
    every: int = knob(1, ge=1)
    metrics_file: str | None = knob(None, help="defaults to <train.output_dir>/metrics.jsonl")
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "longtrain"
    wandb_run_name: str | None = None


@dataclasses.dataclass
class Config:
    """The whole experiment. `longtrain config CONFIG` prints it resolved."""

    model: ModelConfig = knob(factory=ModelConfig)
    mesh: MeshConfig = knob(factory=MeshConfig)
    data: DataConfig = knob(factory=DataConfig)
    optim: OptimConfig = knob(factory=OptimConfig)
    train: TrainConfig = knob(factory=TrainConfig)
    checkpoint: CheckpointConfig = knob(factory=CheckpointConfig)
    logging: LoggingConfig = knob(factory=LoggingConfig)
