"""Checkpoints written by an earlier altgrad_jax (tests/data/checkpoint_v1, see its README) still
restore bit for bit: the on-disk names and layout are a format, not an implementation detail."""

import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from altgrad_jax.ckpt import CheckpointManager, CheckpointVersionWarning, load_checkpoint, load_checkpoint_metadata
from tests._legacy_state import legacy_state

DATA = Path(__file__).resolve().parent / "data" / "checkpoint_v1"


@pytest.fixture
def fixture_copy(tmp_path):
    """A copy, since opening a manager may tidy the directory."""
    shutil.copytree(DATA, tmp_path / "v1")
    return tmp_path / "v1"


@pytest.fixture(autouse=True)
def other_versions_are_fine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointVersionWarning)  # written with the versions of its day
        yield


def assert_identical(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype and got.shape == want.shape
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(want))
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got).reshape(-1).view(np.uint8), np.asarray(want).reshape(-1).view(np.uint8))


def test_run_directory_restores_every_step_and_keeps_its_ranking(fixture_copy):
    target = jax.eval_shape(lambda: legacy_state(0))
    with CheckpointManager(fixture_copy / "run", max_checkpoints=2) as manager:
        assert manager.all_steps() == [1, 2] and manager.best_step() == 2
        for step in (1, 2):
            assert_identical(manager.restore(step, target), legacy_state(step))
            assert manager.metadata(step)["note"] == "v1"
        assert manager.anomaly_steps() == [3]
        assert_identical(manager.restore(3, target, anomaly=True), legacy_state(3))
        step, state, metadata = manager.restore_latest_good(target)
        assert step == 2 and metadata["val_loss"] == 1.5
        assert_identical(state, legacy_state(2))


def test_one_off_checkpoint_loads_with_and_without_target(fixture_copy):
    single = fixture_copy / "single"
    assert_identical(load_checkpoint(single, jax.eval_shape(lambda: legacy_state(0))), legacy_state(4))
    assert load_checkpoint_metadata(single)["note"] == "v1"
    plain = load_checkpoint(single)
    np.testing.assert_array_equal(np.asarray(plain["params"]["h"]["0"]["mlp"]["c_fc"]["kernel"]),
                                  np.asarray(legacy_state(4).params["h"][0]["mlp"]["c_fc"]["kernel"]))
    assert plain["params"]["lm_head"]["kernel"].dtype == jax.numpy.bfloat16
    assert plain["quant_state"]["h/0/mlp/c_fc"]["codes"].dtype == jax.numpy.float8_e4m3fn


def test_new_saves_write_the_same_names(tmp_path):
    """The tensor names in the state file and what Orbax records per step are those of v1."""
    import json

    from altgrad_jax.ckpt.safetensors_handler import read

    with CheckpointManager(tmp_path / "new", max_checkpoints=2) as manager:
        manager.save(1, legacy_state(1), val_loss=2.0, metadata={"note": "v1"})
    for step_dir in (tmp_path / "new" / "1", DATA / "run" / "1"):
        assert sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")) == sorted(
            p.relative_to(DATA / "run" / "1").as_posix() for p in (DATA / "run" / "1").rglob("*"))
    new_meta, old_meta = (json.loads((d / "1" / "_CHECKPOINT_METADATA").read_text()) for d in (tmp_path / "new", DATA / "run"))
    assert new_meta["item_handlers"] == old_meta["item_handlers"]
    (_, new_tree), (_, old_tree) = (read(d / "1" / "state") for d in (tmp_path / "new", DATA / "run"))
    assert new_tree == old_tree
    new_saved, old_saved = (json.loads((d / "1" / "metadata" / "metadata").read_text()) for d in (tmp_path / "new", DATA / "run"))
    assert new_saved["state_leaves"] == old_saved["state_leaves"] and new_saved["prng_keys"] == old_saved["prng_keys"]
