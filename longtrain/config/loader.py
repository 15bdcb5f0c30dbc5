"""Load a `Config` from YAML plus dotted `key=value` overrides, with errors that name the bad key.

The loader walks the dataclass tree with the types from `schema.py`: each value is converted to its field's
declared type (ints, floats, bools, strings, lists, `null` for optional fields, `Literal` choices) and checked
against the field's bounds. Everything that goes wrong raises `ConfigError`, which the CLI turns into exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal

import yaml

from longtrain.config.schema import Config
from longtrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot be used. The message names the key, the value and what is allowed."""

    kind = "config"


# ----------------------------------------------------------------------------------------------- type handling
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"a list of {_type_name(arg)}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _BadValue(Exception):
    pass


def _coerce(value: Any, tp, key: str) -> Any:
    """Convert `value` to type `tp`, or raise _BadValue."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _BadValue
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except _BadValue:
                continue
        raise _BadValue
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _BadValue
    if origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, str) and value.strip() == "":
            return []
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _BadValue
        return [_coerce(v, arg, key) for v in value]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _BadValue
        return _build(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise _BadValue
    if tp is int:
        if isinstance(value, bool):
            raise _BadValue
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if tp is float:
        if isinstance(value, bool):
            raise _BadValue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _BadValue
    raise TypeError(f"config field {key} has unsupported type {tp!r}")


def _check_bounds(value: Any, field: dataclasses.Field, key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    meta = field.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is not finite; expected a finite number")
    rules = []
    if meta.get("ge") is not None and not value >= meta["ge"]:
        rules.append(f">= {meta['ge']}")
    if meta.get("gt") is not None and not value > meta["gt"]:
        rules.append(f"> {meta['gt']}")
    if meta.get("le") is not None and not value <= meta["le"]:
        rules.append(f"<= {meta['le']}")
    if rules:
        allowed = []
        for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<=")):
            if meta.get(name) is not None:
                allowed.append(f"{sym} {meta[name]}")
        raise ConfigError(f"{key}={value!r} is out of range; allowed: {' and '.join(allowed)}")


def _is_choice(tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_choice(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) is Literal


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_abbreviation(short: str, long: str) -> bool:
    """'lr' abbreviates 'learning_rate': same first letter, letters in order."""
    if not short or not long or short[0] != long[0]:
        return False
    it = iter(long)
    return all(ch in it for ch in short)


def _suggest(cls, name: str, prefix: str) -> list[str]:
    """Closest valid keys for an unknown `name` in section `cls` (then anywhere in the tree)."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    local = [f.name for f in dataclasses.fields(cls)]
    picks = difflib.get_close_matches(name, local, n=3, cutoff=0.6)
    picks += [n for n in local if n not in picks and _is_abbreviation(name, n)]
    if picks:
        return [join(n) for n in picks[:3]]
    everywhere = all_keys()
    last = {}
    for key in everywhere:
        last.setdefault(key.rsplit(".", 1)[-1], key)
    picks = difflib.get_close_matches(name, list(last), n=3, cutoff=0.6)
    abbreviations = [n for n in last if n not in picks and _is_abbreviation(name, n)]
    # 'lr' -> learning_rate before low_freq_factor: initials of the words matching is the stronger sign
    abbreviations.sort(key=lambda n: "".join(w[0] for w in n.split("_") if w) != name)
    picks += abbreviations
    return [last[n] for n in picks[:3]]


def _unknown_key_error(cls, name: str, prefix: str, where: str = "") -> ConfigError:
    full = f"{prefix}.{name}" if prefix else name
    close = _suggest(cls, name, prefix)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{full}'{where}{hint}")


def _build(cls, mapping: dict, prefix: str = ""):
    """Build dataclass `cls` from a (possibly partial) mapping, defaults filling the rest."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in mapping.items():
        if name not in fields:
            raise _unknown_key_error(cls, str(name), prefix)
        key = f"{prefix}.{name}" if prefix else name
        try:
            converted = _coerce(value, hints[name], key)
        except _BadValue:
            what = "is not an allowed choice" if _is_choice(hints[name]) else "has the wrong type"
            raise ConfigError(f"{key}={value!r} {what}; expected {_type_name(hints[name])}") from None
        _check_bounds(converted, fields[name], key)
        kwargs[name] = converted
    return cls(**kwargs)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the tree, leaves and sections."""
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], key)
    return keys


# ----------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", parsed value). Values use YAML syntax: 3, 1e-3, true, null, [1, 2]."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Merge dotted overrides into a nested mapping (validation happens when the Config is built)."""
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = tree
        cls = Config
        for depth, part in enumerate(parts[:-1]):
            hints = _hints(cls) if cls is not None else {}
            if cls is not None and part not in hints:
                raise _unknown_key_error(cls, part, ".".join(parts[:depth]), " (from the command line)")
            cls = hints.get(part) if cls is not None else None
            if cls is not None and not dataclasses.is_dataclass(cls):
                raise ConfigError(
                    f"'{'.'.join(parts[:depth + 1])}' is a value, not a section; cannot set '{key}'"
                )
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if cls is not None and parts[-1] not in _hints(cls):
            raise _unknown_key_error(cls, parts[-1], ".".join(parts[:-1]), " (from the command line)")
        node[parts[-1]] = value
    return tree


# ----------------------------------------------------------------------------------------------- loading
def read_yaml(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level, got {type(tree).__name__}")
    return tree


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, *, num_devices: int | None = None
) -> Config:
    """Defaults <- YAML file <- overrides; then types, bounds and cross-field rules are checked."""
    tree = read_yaml(path) if path is not None else {}
    # Check the file alone first so that an error in the file names the file.
    try:
        config_from_file = _build(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {os.fspath(path)})") from None
    if overrides:
        tree = apply_overrides(tree, list(overrides))
        config = _build(Config, tree)
    else:
        config = config_from_file
    check_cross_fields(config, num_devices=num_devices)
    return config


def from_dict(tree: dict, *, num_devices: int | None = None) -> Config:
    config = _build(Config, tree)
    check_cross_fields(config, num_devices=num_devices)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------------------------- cross-field rules
def resolve_mesh_shape(mesh, num_devices: int) -> dict[str, int]:
    """Axis sizes with at most one `-1` filled so that the product equals `num_devices` (the rule lives in
    `longtrain.parallel.mesh`; imported here lazily so loading a config does not import JAX)."""
    from longtrain.parallel.mesh import resolve_axis_sizes

    axes = {"data": mesh.data, "fsdp": mesh.fsdp, "context": mesh.context, "tensor": mesh.tensor}
    try:
        return resolve_axis_sizes(axes, num_devices, key_prefix="mesh.")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_cross_fields(config: Config, *, num_devices: int | None = None) -> None:
    """Rules that involve several fields. Runs before anything is compiled."""
    m = config.model
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads} "
            "(each key/value head serves a whole group of query heads)"
        )
    if m.head_dim is None and m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
            "set model.head_dim explicitly"
        )
    if m.experts_per_token > m.num_experts:
        raise ConfigError(
            f"model.experts_per_token={m.experts_per_token} exceeds model.num_experts={m.num_experts}"
        )
    if config.optim.seco_offload != "none" and config.optim.mode == "full":
        raise ConfigError(
            f"optim.seco_offload={config.optim.seco_offload!r} offloads the chunk-wise K/V buffers; optim.mode='full' "
            "has none: set optim.mode=seco or spaco, or optim.seco_offload=none"
        )
    if config.optim.seco_offload != "none" and m.layer_types is not None and "full_attention" not in m.layer_types:
        raise ConfigError(
            f"optim.seco_offload={config.optim.seco_offload!r} offloads the softmax layers' K/V buffers; "
            f"model.layer_types has no full_attention layer (lightning states are tiny): set optim.seco_offload=none"
        )
    if m.layer_types is not None:
        allowed = ("full_attention", "linear_attention")
        for i, t in enumerate(m.layer_types):
            if t not in allowed:
                raise ConfigError(f"model.layer_types[{i}]={t!r} is not one of {allowed}")
        if len(m.layer_types) != m.num_layers:
            raise ConfigError(
                f"model.layer_types has {len(m.layer_types)} entries but model.num_layers={m.num_layers}"
            )
        if m.architecture != "minimax" and "linear_attention" in m.layer_types:
            raise ConfigError(
                f"model.layer_types has linear_attention layers, which only model.architecture='minimax' supports "
                f"(got {m.architecture!r})"
            )
    if config.optim.warmup_steps > config.train.steps:
        raise ConfigError(
            f"optim.warmup_steps={config.optim.warmup_steps} exceeds train.steps={config.train.steps}"
        )
    d = config.data
    if d.weights is not None and len(d.weights) != len(d.paths):
        raise ConfigError(
            f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}; give one weight per path"
        )
    depth = d.synthetic_needle_depth
    if len(depth) != 2 or not 0.0 <= depth[0] <= depth[1] <= 1.0:
        raise ConfigError(f"data.synthetic_needle_depth={list(depth)} must be [from, to] with 0 <= from <= to <= 1 "
                          "(fractions of the filler before the question)")
    # the longest document a step can hold: a row, or in balance mode a document split over ranks
    key, longest = "data.seq_len", d.seq_len
    if d.balance.enabled and (d.balance.max_doc_len or 0) > d.seq_len:
        key, longest = "data.balance.max_doc_len", d.balance.max_doc_len
    if longest > m.max_position_embeddings:
        rope = m.rope_scaling
        hint = (f"with model.rope_scaling.type={rope.type!r} factor={rope.factor:g}, set "
                f"model.max_position_embeddings to the extended length" if rope.type != "none" else
                f"to extend a pretrained model, also set model.rope_scaling (e.g. type=yarn, "
                f"factor={longest / m.max_position_embeddings:g}, original_max_position_embeddings="
                f"{m.max_position_embeddings})")
        raise ConfigError(f"{key}={longest} exceeds model.max_position_embeddings={m.max_position_embeddings} "
                          f"(positions the model has never seen): raise model.max_position_embeddings to >= "
                          f"{longest} or lower {key} ({hint})")
    if d.source not in ("synthetic",) and not d.paths:
        raise ConfigError(f"data.source={d.source!r} needs data.paths (files or glob patterns)")
    if num_devices is not None:
        axes = resolve_mesh_shape(config.mesh, num_devices)
        if d.batch_size % (axes["data"] * axes["fsdp"]):
            raise ConfigError(
                f"data.batch_size={d.batch_size} must be divisible by mesh.data x mesh.fsdp = "
                f"{axes['data'] * axes['fsdp']} (each data-parallel shard gets whole rows)"
            )
        if d.seq_len % axes["context"]:
            raise ConfigError(
                f"data.seq_len={d.seq_len} must be divisible by mesh.context={axes['context']}"
            )
        chunkwise = config.optim.mode in ("seco", "spaco")
        if config.optim.seco_params != "zero3" and not (chunkwise and axes["context"] > 1):
            raise ConfigError(
                f"optim.seco_params={config.optim.seco_params!r} says how chunk-wise training across the context "
                f"axis holds the parameters; it needs optim.mode=seco or spaco and mesh.context > 1 (got "
                f"optim.mode={config.optim.mode!r}, mesh.context={axes['context']})"
            )
        unit = 2 * axes["context"]
        if chunkwise and unit > 2 and config.optim.chunk_size < d.seq_len and config.optim.chunk_size % unit:
            raise ConfigError(
                f"optim.chunk_size={config.optim.chunk_size} must be a multiple of 2 x mesh.context = {unit} for "
                f"chunk-wise training across the context axis (each chunk splits into {unit} zigzag pieces)"
            )
        if m.num_heads % axes["tensor"]:
            raise ConfigError(
                f"model.num_heads={m.num_heads} must be divisible by mesh.tensor={axes['tensor']}"
            )
