"""The harness itself: simulated devices and hardware markers."""
import pytest


def test_eight_devices_visible():
    import jax

    assert jax.device_count() == 8
    assert len({d.id for d in jax.devices()}) == 8


@pytest.mark.gpu
def test_gpu_marker_skips_without_gpu():
    import jax

    assert jax.devices()[0].platform == "gpu"  # runs only where a GPU exists
