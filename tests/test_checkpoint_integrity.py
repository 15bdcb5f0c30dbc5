"""Checkpoints verify themselves: checksums of sharded arrays (independent of the sharding), and restore_latest
falling back past a corrupt step (truncated, deleted or flipped file) with a one-line report, moving it aside.
The trainer-level tests (bitwise continuation, two processes) are in test_train_e2e.py."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from longtrain.config import ConfigError
from longtrain.errors import CheckpointError
from longtrain.train import checksums
from longtrain.train.checkpoint import CheckpointCorrupt, Checkpointer


def _mesh(shape, names):
    return jax.sharding.Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _like(sharding, spec):
    return NamedSharding(sharding.mesh, spec)


def _state(seed, sharding):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "params": {"w": jax.device_put(jax.random.normal(k1, (64, 32)), sharding),
                   "b": jax.device_put(jax.random.normal(k2, (16,)).astype(jnp.bfloat16), sharding)},
        "rng": jax.device_put(jax.random.PRNGKey(seed + 100), _like(sharding, P())),
        "step": jax.device_put(jnp.int32(seed), _like(sharding, P())),
    }


@pytest.fixture
def sharding():
    return NamedSharding(_mesh((8,), ("d",)), P("d"))


def test_checksums_do_not_depend_on_the_sharding(sharding):
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 48))
    on_one = checksums.tree_checksums({"x": x})
    for spec in (P("d"), P(None, "d"), P()):
        assert checksums.tree_checksums({"x": jax.device_put(x, _like(sharding, spec))}) == on_one
    two_d = NamedSharding(_mesh((2, 4), ("a", "b")), P("b", "a"))
    assert checksums.tree_checksums({"x": jax.device_put(x, two_d)}) == on_one


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_])
def test_checksums_change_with_any_single_bit_and_with_a_swap(dtype):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2 if dtype == jnp.bool_ else 200, (6, 10)).astype(np.dtype(dtype))
    ref = checksums.tree_checksums({"x": jnp.asarray(base)})["x"]
    raw = base.view(np.uint8).reshape(-1)
    for byte in rng.choice(raw.size, 12, replace=False):
        for bit in (0, 7) if dtype != jnp.bool_ else (0,):
            flipped = raw.copy()
            flipped[byte] ^= np.uint8(1 << bit)
            x = jnp.asarray(flipped.view(np.dtype(dtype)).reshape(base.shape))
            assert checksums.tree_checksums({"x": x})["x"] != ref, (byte, bit)
    swapped = base.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    if not np.array_equal(swapped, base):
        assert checksums.tree_checksums({"x": jnp.asarray(swapped)})["x"] != ref


def _save_three(directory, sharding):
    ckpt = Checkpointer(directory, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step, sharding), {"position": step, "blob": b"\x00\xff"}, {"model": {"width": 8}})
    ckpt.close()


def _state_files(step_dir):
    """The array data files of a step (OCDBT keeps a process-local copy and a merged one; which one a read uses
    is orbax's business, so the tests corrupt all of them)."""
    return glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)


def _corrupt(path, how):
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "delete":
        os.remove(path)
    else:  # flip one byte in the middle
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x24
        open(path, "wb").write(bytes(data))


def _abstract(sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0, sharding))


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_a_corrupt_latest_step_falls_back_to_the_previous_one(tmp_path, sharding, how):
    directory = str(tmp_path / "ckpt")
    _save_three(directory, sharding)
    for path in _state_files(os.path.join(directory, "3")):
        _corrupt(path, how)
    reports = []
    step, state, data_state, config = Checkpointer(directory, keep=3).restore_latest(
        _abstract(sharding), report=reports.append)
    assert step == 2 and data_state == {"position": 2, "blob": b"\x00\xff"} and config == {"model": {"width": 8}}
    expected = _state(2, sharding)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert len(reports) == 1 and "\n" not in reports[0]
    assert "checkpoint step 3 is corrupt: state" in reports[0] and "falling back to step 2" in reports[0]
    assert os.path.isdir(os.path.join(directory, "corrupt", "3"))  # moved aside, not deleted
    assert Checkpointer(directory, keep=3).all_steps() == [1, 2]


def test_readable_but_wrong_arrays_are_caught_by_their_checksums(tmp_path, sharding):
    """Bytes that still decode (what a flipped bit in an uncompressed block gives) restore without any error
    from orbax: only the checksums see it. Step 2's state under step 3's name is such a checkpoint."""
    import shutil

    directory = str(tmp_path / "ckpt")
    _save_three(directory, sharding)
    shutil.rmtree(os.path.join(directory, "3", "state"))
    shutil.copytree(os.path.join(directory, "2", "state"), os.path.join(directory, "3", "state"))
    reports = []
    step, *_ = Checkpointer(directory, keep=3).restore_latest(_abstract(sharding), report=reports.append)
    assert step == 2
    assert "checkpoint step 3 is corrupt: state/params/b (and 3 more): checksum mismatch" in reports[0]


def test_flipped_data_state_is_caught_by_its_checksum(tmp_path, sharding):
    directory = str(tmp_path / "ckpt")
    _save_three(directory, sharding)
    path = os.path.join(directory, "3", "data", "metadata")
    text = open(path).read()
    assert '"position": 3' in text
    open(path, "w").write(text.replace('"position": 3', '"position": 4'))  # still valid JSON
    reports = []
    step, *_ = Checkpointer(directory, keep=3).restore_latest(_abstract(sharding), report=reports.append)
    assert step == 2 and "data/metadata: checksum mismatch" in reports[0]


def test_every_step_corrupt_is_an_error_that_says_so(tmp_path, sharding):
    directory = str(tmp_path / "ckpt")
    _save_three(directory, sharding)
    for step in (1, 2, 3):
        for path in _state_files(os.path.join(directory, str(step))):
            _corrupt(path, "delete")
    reports = []
    with pytest.raises(CheckpointError, match="no checkpoint .* could be restored .*3 moved"):
        Checkpointer(directory, keep=3).restore_latest(_abstract(sharding), report=reports.append)
    assert len(reports) == 3 and "no older checkpoint left" in reports[-1]
    assert sorted(os.listdir(os.path.join(directory, "corrupt"))) == ["1", "2", "3"]


def test_the_config_check_runs_before_the_state_is_read(tmp_path, sharding):
    """A refused resume (e.g. another model) is a config error, not a corruption: nothing is moved aside."""
    directory = str(tmp_path / "ckpt")
    _save_three(directory, sharding)

    def refuse(step, saved):
        raise ConfigError(f"step {step} was {saved['model']}")

    wrong_shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct((3,) + s.shape, s.dtype), _abstract(sharding))
    with pytest.raises(ConfigError, match="step 3 was {'width': 8}"):
        Checkpointer(directory, keep=3).restore_latest(wrong_shapes, check_config=refuse)
    assert not os.path.exists(os.path.join(directory, "corrupt"))


def test_restore_names_the_step_and_raises_corrupt(tmp_path, sharding):
    directory = str(tmp_path / "ckpt")
    _save_three(directory, sharding)
    os.remove(os.path.join(directory, "3", "config", "metadata"))
    with pytest.raises(CheckpointCorrupt) as err:
        Checkpointer(directory, keep=3).restore(3, _abstract(sharding))
    assert err.value.step == 3 and "\n" not in str(err.value)
