"""SeCO host offload (`optim.seco_offload: host`, issue 16 item 2): the K/V buffers and their cotangent accumulator
live in host memory and stream to the device one layer slice at a time. Results equal offload off bitwise; the
program asks for host placement of exactly those buffers (read from the cuda lowering: XLA:CPU drops in-program
placements, see DESIGN.md §6); `plan` reports their bytes as host memory, apart from the device total."""
import re

import jax
import jax.numpy as jnp
import pytest

from longtrain import models, parallel
from longtrain.chunkwise import seco_grad
from test_chunkwise_exact import _hybrid64, _llama64, _packed_batch

pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _bitwise(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("make", [lambda: _llama64(scan_layers=True, remat="full"), _hybrid64],
                         ids=["llama", "hybrid"])
@pytest.mark.parametrize("context", [1, 4])
def test_offload_equals_no_offload_bitwise(make, context):
    config = make()
    params = models.init(config, jax.random.PRNGKey(0))
    batch = _packed_batch(2, 40, config.vocab_size)
    mesh = parallel.make_mesh(data=2, context=4) if context > 1 else None
    off = jax.jit(lambda p, b: seco_grad(config, p, b, 16, mesh=mesh))(params, batch)
    on = jax.jit(lambda p, b: seco_grad(config, p, b, 16, mesh=mesh, offload=True))(params, batch)
    assert _bitwise(on, off)


def _host_placed_shapes(config, params, batch, offload):
    """Tensor types the cuda lowering annotates for placement in pinned host memory."""
    traced = jax.jit(lambda p, b: seco_grad(config, p, b, 16, offload=offload)).trace(params, batch)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    return re.findall(r'annotate_device_placement\(%\S+\) \{[^}]*_xla_buffer_placement = "pinned_host"[^}]*\}\} : '
                      r'\((tensor<[^>]+>)\)', text)


def test_the_buffers_and_the_accumulator_are_placed_in_host_memory():
    config = _llama64()
    params = models.init(config, jax.random.PRNGKey(0))
    batch = _packed_batch(2, 40, config.vocab_size)
    assert _host_placed_shapes(config, params, batch, offload=False) == []
    placed = set(_host_placed_shapes(config, params, batch, offload=True))
    L, Tp, Hkv, D = config.num_layers, 48, config.num_kv_heads, config.resolved_head_dim
    whole = f"tensor<{L}x2x{Tp}x{Hkv}x{D}xf64>"  # K/V buffers and their accumulator (fp64 model: both f64)
    assert whole in placed, placed
    layer = f"tensor<2x{Tp}x{Hkv}x{D}xf64>"  # one layer's accumulator slice written back after its add
    assert layer in placed, placed


def test_plan_reports_offloaded_bytes_as_host_memory():
    from longtrain.chunkwise import offloaded_bytes_per_device
    from longtrain.commands.plan import plan
    from longtrain.config import load_config

    over = ["model.vocab_size=256", "model.hidden_size=32", "model.intermediate_size=48", "model.num_heads=4",
            "model.num_kv_heads=2", "model.num_layers=2", "data.seq_len=96", "data.batch_size=2", "mesh.data=2",
            "mesh.context=4", "optim.mode=seco", "optim.chunk_size=40", "train.steps=4", "optim.warmup_steps=0"]
    with jax.enable_x64(False):
        on = plan(load_config(None, over + ["optim.seco_offload=host"], num_devices=8))
        off = plan(load_config(None, over, num_devices=8))
    # per device: 1 row, the padded 120 tokens / 4 ranks, 2 layers x (k + v) x 2 heads x 8 dims, fp32 values + fp32
    # accumulator
    assert on["host"] == 1 * (120 // 4) * 2 * 2 * 2 * 8 * (4 + 4) == offloaded_bytes_per_device(
        load_config(None, over + ["optim.seco_offload=host"], num_devices=8), {"data": 2, "context": 4})
    assert off["host"] == 0
    # the device total leaves the offloaded bytes out (the programs' temps differ a little: offload streams each
    # layer's accumulator slice through the device instead of a scatter-add)
    assert on["total"] + on["host"] - on["temp"] == off["total"] - off["temp"]


def test_offload_without_chunkwise_training_is_refused_by_name():
    from longtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="optim.seco_offload='host'.*optim.mode='full'"):
        load_config(None, ["optim.seco_offload=host"])
    with pytest.raises(ConfigError, match="optim.seco_params='replicated'.*mesh.context=1"):
        load_config(None, ["optim.seco_params=replicated", "optim.mode=seco", "mesh.data=8", "mesh.context=-1"],
                    num_devices=8)
    with pytest.raises(ConfigError, match="optim.chunk_size=20 must be a multiple of 2 x mesh.context = 8"):
        load_config(None, ["optim.mode=seco", "optim.chunk_size=20", "mesh.data=2", "mesh.context=4",
                           "data.seq_len=128"], num_devices=8)
    with pytest.raises(ConfigError, match="optim.seco_offload='host'.*no full_attention"):
        load_config(None, ["optim.mode=seco", "optim.seco_offload=host", "model.architecture=minimax",
                           "model.num_layers=2", "model.layer_types=[linear_attention,linear_attention]"])


def test_offloaded_bytes_count_one_micro_batch():
    from longtrain.chunkwise import offloaded_bytes_per_device
    from longtrain.config import load_config

    over = ["optim.mode=seco", "optim.seco_offload=host", "data.batch_size=8", "mesh.data=2", "mesh.context=4"]
    one = offloaded_bytes_per_device(load_config(None, over, num_devices=8), {"data": 2, "context": 4})
    two = offloaded_bytes_per_device(load_config(None, over + ["optim.grad_accum=2"], num_devices=8),
                                     {"data": 2, "context": 4})
    assert one == 2 * two > 0
