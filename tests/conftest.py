"""Test harness: 8 simulated CPU devices for every test, and markers for hardware-specific tests.

XLA_FLAGS must be set before JAX is imported anywhere, so it is done at the top of this file, which pytest
imports before any test module. Subprocesses started by tests inherit it through os.environ.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("WANDB_MODE", "offline")  # tests never talk to the wandb servers

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy case, excluded from the default run (-m slow runs it)")
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU; skipped elsewhere")
    config.addinivalue_line("markers", "tpu: needs a TPU; skipped elsewhere")
    config.addinivalue_line("markers", "multiprocess: starts several JAX processes on this machine")


def _platform() -> str:
    import jax

    try:
        return jax.devices()[0].platform
    except RuntimeError:
        return "cpu"


def pytest_collection_modifyitems(config, items):
    needs = [(name, name) for name in ("gpu", "tpu")]
    if not any(item.get_closest_marker(n) for item in items for n, _ in needs):
        return
    platform = _platform()
    for item in items:
        for marker, wanted in needs:
            if item.get_closest_marker(marker) and platform != wanted:
                item.add_marker(pytest.mark.skip(reason=f"needs a {wanted.upper()}; this run has platform '{platform}'"))


@pytest.fixture
def repo_root() -> str:
    return REPO_ROOT
