"""Hugging Face interop: `import_hf(path) -> (config, params)` and `export_hf(config, params, path)` for every
architecture registered in `longtrain.hf.registry.CONVERTERS`."""
from longtrain.hf.convert import copy_assets, export_hf, import_hf
from longtrain.hf.registry import CONVERTERS, TensorSpec, UnsupportedConfigError, get_converter
from longtrain.hf.safetensors_io import CheckpointFormatError

__all__ = ["CONVERTERS", "CheckpointFormatError", "TensorSpec", "UnsupportedConfigError", "copy_assets",
           "export_hf", "get_converter", "import_hf"]
