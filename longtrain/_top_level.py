"""Keep the repo's top-level `models/`, `parallel/` and `kernels/` folders from shadowing other packages.

Those folders install as `longtrain.models`, `longtrain.parallel` and `longtrain.kernels`, but they sit at the repo
root, and Python started there (`python -c`, `python -m pytest`, a REPL) puts the root first on `sys.path`. Then
`import kernels` would find our folder instead of Hugging Face's `kernels` package, which `transformers` imports.
Each of the three `__init__.py` files calls `step_aside` first when it is imported under its bare name: the
package of that name from the rest of `sys.path` is loaded in its place, or the import fails as for a missing
module. Under the `longtrain.` name nothing changes.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def step_aside(name: str, init_file: str) -> None:
    """Replace `sys.modules[name]` (our folder, imported as a top-level name) by the package `name` found on
    `sys.path` outside the repo root, or raise ModuleNotFoundError. The import statement that got here returns
    whatever `sys.modules[name]` holds when this module's body ends, so the caller sees the other package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r} (the folder {os.path.join(root, name)} is "
                                  f"longtrain.{name}: import it by that name)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
