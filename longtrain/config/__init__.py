"""Typed experiment configuration: schema, YAML loading, dotted overrides and validation."""
from longtrain.config.loader import (
    ConfigError,
    all_keys,
    apply_overrides,
    check_cross_fields,
    from_dict,
    load_config,
    parse_override,
    resolve_mesh_shape,
    to_dict,
    to_yaml,
)
from longtrain.config.schema import (
    BalanceConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RopeScalingConfig,
    TrainConfig,
)

__all__ = [
    "BalanceConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig", "MeshConfig",
    "ModelConfig", "OptimConfig", "RopeScalingConfig", "TrainConfig", "all_keys", "apply_overrides",
    "check_cross_fields", "from_dict", "load_config", "parse_override", "resolve_mesh_shape", "to_dict", "to_yaml",
]
