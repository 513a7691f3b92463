"""The state file itself: every dtype and shape round trips, and it is plain safetensors."""

import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from altgrad_jax.ckpt import CheckpointError, CheckpointManager, load_checkpoint, save_checkpoint
from altgrad_jax.ckpt.safetensors_handler import STATE_FILE, TREE_METADATA_KEY


def odd_state():
    rng = np.random.default_rng(0)
    return {
        "f32": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
        "e5m2": jnp.asarray(rng.normal(size=(4,)), jnp.float8_e5m2),
        "e4m3": jnp.asarray(rng.normal(size=(4,)), jnp.float8_e4m3fn),
        "flags": jnp.asarray([True, False, True]),
        "i8": jnp.asarray([-128, 0, 127], jnp.int8),
        "scalar": jnp.float32(2.5),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "nested": [jnp.arange(3, dtype=jnp.int32), (jnp.ones((2,), jnp.float16), jnp.uint32(7))],
        "key": jax.random.key(11),
        "host": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # a NumPy leaf, not contiguous
    }


def bits(leaf) -> np.ndarray:
    """The raw bytes of a leaf, so that NaN payloads and -0.0 compare too."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    array = np.ascontiguousarray(np.asarray(leaf))
    return array.reshape(-1).view(np.uint8)


def test_every_dtype_and_shape_round_trips_bitwise(tmp_path):
    state = odd_state()
    save_checkpoint(tmp_path / "c", state)
    restored = load_checkpoint(tmp_path / "c", jax.eval_shape(odd_state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(bits(got), bits(want))
    assert str(jax.random.key_impl(restored["key"])) == "threefry2x32"


def test_without_a_target_containers_come_back_as_dicts_and_lists(tmp_path):
    save_checkpoint(tmp_path / "c", odd_state())
    plain = load_checkpoint(tmp_path / "c")
    assert isinstance(plain, dict) and isinstance(plain["nested"], list) and isinstance(plain["nested"][1], list)
    assert int(plain["nested"][1][1]) == 7 and plain["nested"][1][0].dtype == jnp.float16
    assert plain["bf16"].dtype == jnp.bfloat16 and plain["e5m2"].dtype == jnp.float8_e5m2
    assert jax.dtypes.issubdtype(plain["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(np.asarray(plain["host"]), np.arange(6, dtype=np.float32).reshape(2, 3).T)


def test_the_file_is_plain_safetensors_named_by_key_path(tmp_path):
    state = odd_state()
    save_checkpoint(tmp_path / "c", state)
    path = tmp_path / "c" / "state" / STATE_FILE
    tensors = safetensors.numpy.load_file(path)  # safetensors' own reader
    assert sorted(tensors) == sorted(["f32", "bf16", "e5m2", "e4m3", "flags", "i8", "scalar", "empty",
                                      "nested.0", "nested.1.0", "nested.1.1", "key", "host"])
    np.testing.assert_array_equal(tensors["f32"], np.asarray(state["f32"]))
    np.testing.assert_array_equal(tensors["host"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    assert tensors["scalar"].shape == () and tensors["empty"].shape == (0, 4)
    # dtypes NumPy cannot name are stored as same-width unsigned integers
    assert tensors["bf16"].dtype == np.uint16 and tensors["e5m2"].dtype == np.uint8
    np.testing.assert_array_equal(tensors["bf16"], np.asarray(state["bf16"]).view(np.uint16))
    np.testing.assert_array_equal(tensors["key"], np.asarray(jax.random.key_data(state["key"])))
    # the header, read by hand: an 8-byte little-endian length, then JSON
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    leaves = {leaf["name"]: leaf for leaf in json.loads(header["__metadata__"][TREE_METADATA_KEY])["leaves"]}
    assert leaves["e4m3"]["dtype"] == "float8_e4m3fn" and leaves["nested.1.0"]["path"] == ["nested", 1, 0]
    assert leaves["key"]["key_impl"] == "threefry2x32"


def test_numpy_leaves_are_copied_when_the_save_starts(tmp_path):
    host = np.zeros((1 << 20,), np.float32)
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, {"host": host})
        host[:] = 5.0  # the caller reuses its buffer while the save is written
        manager.wait_until_finished()
        restored = manager.restore(1, {"host": jax.ShapeDtypeStruct(host.shape, host.dtype)})
    assert float(np.abs(np.asarray(restored["host"])).max()) == 0.0


def test_two_leaves_with_one_name_are_refused(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        with pytest.raises(CheckpointError, match=r"cannot save step 1: two leaves share the name 'a\.b'"):
            manager.save(1, {"a.b": jnp.zeros(2), "a": {"b": jnp.ones(2)}})
        assert manager.all_steps() == []


def test_float8_values_survive_the_unsigned_view(tmp_path):
    """Every E5M2 code (NaNs and infinities included) comes back with its bits."""
    every_code = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e5m2)
    save_checkpoint(tmp_path / "c", {"codes": jnp.asarray(every_code)})
    restored = load_checkpoint(tmp_path / "c", {"codes": jax.ShapeDtypeStruct((256,), jnp.float8_e5m2)})
    np.testing.assert_array_equal(np.asarray(restored["codes"]).view(np.uint8), np.arange(256, dtype=np.uint8))


def test_a_state_that_is_one_array_round_trips_without_target(tmp_path):
    save_checkpoint(tmp_path / "c", jnp.arange(5, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(load_checkpoint(tmp_path / "c")), np.arange(5, dtype=np.int32))
