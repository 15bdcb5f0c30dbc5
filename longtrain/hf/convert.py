"""`import_hf` / `export_hf`: Hugging Face folder <-> (ModelConfig, params), streamed tensor by tensor.

Import preallocates the parameter pytree once (numpy, `config.param_dtype`) and fills it one HF tensor at a time,
so host memory stays near one copy of the model. Export writes each HF tensor as it is produced from its params
leaf (a layer slice of a stacked leaf is moved to host on its own), never a second full copy.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile

import jax
import numpy as np

from longtrain.hf.registry import UnsupportedConfigError, get_converter
from longtrain.hf.safetensors_io import CheckpointFormatError, SafetensorsReader, write_sharded

# Files besides weights and config that a HF model folder carries; copied through when present.
ASSET_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
               "chat_template.json")
# Buffers some old checkpoints store that are recomputed, not learned.
IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
EXPORT_DTYPES = {"float32": np.dtype("float32"), "fp32": np.dtype("float32"), "bfloat16": None, "bf16": None,
                 "float16": np.dtype("float16"), "fp16": np.dtype("float16")}


def read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: not a Hugging Face model folder")
    with open(config_path) as fh:
        return json.load(fh)


def config_from_hf_dir(path: str):
    """(converter, ModelConfig) of a HF folder's config.json."""
    config_path = os.path.join(path, "config.json")
    hf = read_hf_config(path)
    if "model_type" not in hf:
        raise UnsupportedConfigError(f"{config_path}: no 'model_type' field")
    converter = get_converter(hf["model_type"], source=config_path)
    return converter, converter.config_from_hf(hf, source=config_path)


def _param_shapes(config):
    from longtrain import models

    return jax.eval_shape(lambda: models.init(config, jax.random.key(0)))


def _get_leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def import_hf(path: str):
    """(ModelConfig, params) from a HF folder (config.json + safetensors). Params are numpy arrays in
    `config.param_dtype`, laid out as `longtrain.models.init` makes them."""
    converter, config = config_from_hf_dir(path)
    reader = SafetensorsReader(path)
    params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), _param_shapes(config))
    specs = converter.tensor_specs(config)
    filled = set()
    for spec in specs:
        if spec.hf_name not in reader.entries:
            raise CheckpointFormatError(f"{reader.described_as}: missing tensor {spec.hf_name!r} "
                                        f"(model_type {converter.model_type!r} needs it)")
        shape = reader.shape(spec.hf_name)
        if shape != tuple(spec.hf_shape):
            raise CheckpointFormatError(f"{reader.file_of(spec.hf_name)}: tensor {spec.hf_name!r} has shape "
                                        f"{list(shape)}; config.json implies {list(spec.hf_shape)}")
        leaf = _get_leaf(params, spec.path)
        value = spec.to_params(reader.read(spec.hf_name))
        if spec.layer is None:
            leaf[...] = value
        else:
            leaf[spec.layer] = value
        filled.add(spec.hf_name)
    for derived in _derived_tensors(converter, config):  # config-only buffers: checked when present, not loaded
        if derived.hf_name in reader.entries:
            derived.check(reader.read(derived.hf_name), source=reader.file_of(derived.hf_name))
            filled.add(derived.hf_name)
    tied = config.tie_embeddings and "lm_head.weight" in reader.entries
    unexpected = sorted(n for n in reader.names() - filled
                        if not n.endswith(IGNORED_TENSOR_SUFFIXES) and not (tied and n == "lm_head.weight"))
    if unexpected:
        raise CheckpointFormatError(f"{reader.described_as}: unexpected tensor(s) for model_type "
                                    f"{converter.model_type!r}: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    _check_covered(config, converter, specs)
    return config, params


def _derived_tensors(converter, config):
    """HF tensors computed from the config alone (e.g. MiniMax decay buffers); optional converter method."""
    return converter.derived_tensors(config) if hasattr(converter, "derived_tensors") else []


def _check_covered(config, converter, specs):
    """Every params leaf (and every layer of a stacked one) is written by some spec. `spec.layer` is an int index
    along the leading `layers` axis, or a tuple indexing several leading axes (e.g. (layer, expert))."""
    covered = {}
    for spec in specs:
        covered.setdefault(spec.path, set()).add(spec.layer)
    for path, shape in jax.tree_util.tree_flatten_with_path(_param_shapes(config))[0]:
        key = tuple(p.key for p in path)
        layers = covered.get(key)
        if key[0] != "layers":
            want = {None}
        elif layers and isinstance(next(iter(layers)), tuple):
            want = set(itertools.product(*(range(n) for n in shape.shape[:len(next(iter(layers)))])))
        else:
            want = set(range(shape.shape[0]))
        if layers != want:
            raise RuntimeError(f"converter {converter.model_type!r} does not map params leaf {'.'.join(key)} fully")


def _export_dtype(dtype):
    if dtype is None:
        return None
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype={dtype!r} is not supported; choose one of {sorted(EXPORT_DTYPES)}")
    import ml_dtypes

    return EXPORT_DTYPES[dtype] or np.dtype(ml_dtypes.bfloat16)


def export_hf(config, params, path: str, *, dtype: str | None = None, source_dir: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write a HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `dtype`: storage dtype (float32 / bfloat16 / float16; default: the params' own dtype). `source_dir`: a folder
    whose tokenizer files and generation_config.json are copied. Returns the written file names.
    """
    converter = get_converter(config.architecture, source="model config")
    hf_config = converter.config_to_hf(config)
    out_dtype = _export_dtype(dtype)
    final, path = path, _fresh_sibling(path, "tmp")
    try:
        written = _write_export(converter, config, params, hf_config, out_dtype, path, source_dir, max_shard_bytes)
        _swap_in(path, final)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return written


def _fresh_sibling(path: str, tag: str) -> str:
    """A new empty folder beside `path` (same file system, so renames are atomic)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.{tag}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    return folder


def _swap_in(new: str, final: str) -> None:
    """Replace the folder `final` by `new`, so no file of an earlier export survives. A folder holding anything an
    export does not write is refused, naming the files, instead of being deleted."""
    if os.path.isdir(final):
        ours = re.compile(r"(config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json)$")
        foreign = sorted(n for n in os.listdir(final) if not ours.match(n) and n not in ASSET_FILES)
        if foreign:
            raise FileExistsError(f"export folder {final} holds files an export does not write ({foreign[:5]}); "
                                  "export into an empty or earlier-export folder")
        old = _fresh_sibling(final, "old")
        os.rename(final, os.path.join(old, "export"))
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, final)


def _write_export(converter, config, params, hf_config, out_dtype, path, source_dir, max_shard_bytes) -> list[str]:
    specs = converter.tensor_specs(config)
    items = []
    for spec in specs:
        leaf = _get_leaf(params, spec.path)
        target = out_dtype or np.dtype(leaf.dtype)

        def produce(leaf=leaf, spec=spec, target=target):
            value = leaf if spec.layer is None else leaf[spec.layer]
            return spec.to_hf(np.asarray(value)).astype(target, copy=False)

        items.append((spec.hf_name, tuple(spec.hf_shape), target, produce))
    for derived in _derived_tensors(converter, config):
        target = out_dtype or np.dtype(np.float32)
        items.append((derived.hf_name, tuple(derived.hf_shape), target,
                      lambda derived=derived, target=target: derived.produce().astype(target, copy=False)))
    written = write_sharded(path, items, max_shard_bytes)
    storage = (out_dtype or np.dtype(jax.tree.leaves(params)[0].dtype)).name
    hf_config = {"architectures": [converter.architecture_class], "model_type": converter.model_type,
                 **hf_config, "dtype": storage}
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf_config, fh, indent=2, sort_keys=True)
    written.append("config.json")
    written += _write_assets(config, path, source_dir)
    return written


def _write_assets(config, path: str, source_dir: str | None) -> list[str]:
    copied = []
    if source_dir is not None:
        for name in ASSET_FILES:
            src = os.path.join(source_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(path, name))
                copied.append(name)
    if "generation_config.json" not in copied:
        generation = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
                      "eos_token_id": (None if config.eos_token_id is None else
                                       config.eos_token_id[0] if len(config.eos_token_id) == 1
                                       else list(config.eos_token_id))}
        with open(os.path.join(path, "generation_config.json"), "w") as fh:
            json.dump({k: v for k, v in generation.items() if v is not None}, fh, indent=2)
        copied.append("generation_config.json")
    return copied


def copy_assets(source_dir: str, dest_dir: str) -> list[str]:
    """Copy the tokenizer / generation files of a HF folder (used by `longtrain import` to keep them)."""
    os.makedirs(dest_dir, exist_ok=True)
    copied = []
    for name in ASSET_FILES:
        src = os.path.join(source_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dest_dir, name))
            copied.append(name)
    return copied
