"""Checkpoints on real temporary directories: retention, exact restore, faults."""

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from altgrad_jax.ckpt import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointVersionWarning,
    load_checkpoint,
    load_checkpoint_metadata,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import _ckpt_writer  # noqa: E402


@flax.struct.dataclass
class StandInState:
    """Same container classes as the real TrainState: dataclass, dicts, optax chain, typed key."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    quant_state: dict
    key: jax.Array


def make_optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


def make_state(step: int, n_embd: int = 8, key_impl: str | None = None) -> StandInState:
    rng = np.random.default_rng(step)
    params = {
        "wte": {"embedding": jnp.asarray(rng.normal(size=(16, n_embd)), jnp.float32)},
        "h": {"0": {"mlp": {"c_fc": {"kernel": jnp.asarray(rng.normal(size=(n_embd, 4 * n_embd)), jnp.float32)}}}},
        "ln_f": {"scale": jnp.ones((n_embd,), jnp.float32)},
    }
    tx = make_optimizer()
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu, nu and count
    quant_state = {
        "h/0/mlp/c_fc": {
            "amax_history": jnp.asarray(rng.uniform(size=(4,)), jnp.float32),
            "scale": jnp.asarray(rng.uniform(), jnp.bfloat16),
            "updates": jnp.asarray(rng.integers(0, 100, size=(3,)), jnp.int8),
        }
    }
    key = jax.random.key(step, impl=key_impl) if key_impl else jax.random.key(step)
    return StandInState(jnp.int32(step), params, opt_state, quant_state, key)


def abstract_state(**kwargs):
    return jax.eval_shape(lambda: make_state(0, **kwargs))


def assert_states_identical(restored, expected):
    """Same tree (types included), same dtypes, same bits; typed keys compared by data and impl."""
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype and got.shape == want.shape
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(want))
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), strict=True)


def expected_kept(losses, n):
    """Independent rule: the last n steps plus the newest step holding the lowest finite loss."""
    steps = list(range(len(losses)))
    finite = [(loss, step) for step, loss in zip(steps, losses) if loss is not None and math.isfinite(loss)]
    best = max(finite, key=lambda item: (-item[0], item[1]))[1] if finite else None
    kept = set(steps[-n:]) | ({best} if best is not None else set())
    return sorted(kept), best


def tiny_state(step):
    return {"w": jnp.full((4,), step, jnp.float32), "key": jax.random.key(step)}


# ---- retention ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_checkpoints,seed", [(1, 0), (2, 1), (3, 2)])
def test_retention_is_last_n_plus_best_over_random_losses(tmp_path, max_checkpoints, seed):
    rng = np.random.default_rng(seed)
    n_saves = 24
    losses = list(np.round(rng.uniform(1.0, 3.0, size=n_saves), 1))  # rounding makes ties
    for i in rng.choice(n_saves, size=5, replace=False):
        losses[i] = float("nan")
    losses[int(rng.integers(n_saves))] = None
    losses[3] = float("inf")
    losses[-8:] = [10.0 + i for i in range(7)] + [float("nan")]  # a worsening tail, then NaN
    with CheckpointManager(tmp_path, max_checkpoints=max_checkpoints) as manager:
        for step, loss in enumerate(losses):
            manager.save(step, tiny_state(step), val_loss=loss)
            manager.wait_until_finished()
            kept, best = expected_kept(losses[: step + 1], max_checkpoints)
            assert manager.all_steps() == kept, f"after step {step}"
            assert manager.best_step() == best
            assert manager.latest_step() == step
    assert best is not None and best < n_saves - 8  # the best lies before the worsening tail
    reopened = CheckpointManager(tmp_path, max_checkpoints=max_checkpoints)
    assert reopened.all_steps() == kept and reopened.best_step() == best
    reopened.save(n_saves, tiny_state(n_saves), val_loss=float("nan"))
    reopened.close()
    assert CheckpointManager(tmp_path, max_checkpoints).all_steps() == expected_kept(losses + [math.nan], max_checkpoints)[0]


def test_without_any_finite_loss_nothing_is_best(tmp_path):
    with CheckpointManager(tmp_path, max_checkpoints=2) as manager:
        for step, loss in enumerate([None, float("nan"), None, float("inf"), float("nan")]):
            manager.save(step, tiny_state(step), val_loss=loss)
        manager.wait_until_finished()
        assert manager.all_steps() == [3, 4]
        assert manager.best_step() is None
        manager.save(5, tiny_state(5), val_loss=7.0)
        manager.save(6, tiny_state(6), val_loss=jnp.float32(9.0))
        manager.save(7, tiny_state(7))
        manager.wait_until_finished()
        assert manager.all_steps() == [5, 6, 7] and manager.best_step() == 5


# ---- exact restore -----------------------------------------------------------------------


def test_reopened_manager_restores_every_kept_step_exactly(tmp_path):
    losses = [2.0, 1.0, 3.0, None, 4.0]
    states = {step: make_state(step) for step in range(len(losses))}
    with CheckpointManager(tmp_path, max_checkpoints=2) as manager:
        for step, loss in enumerate(losses):
            manager.save(step, states[step], val_loss=loss, metadata={"run_id": "abc", "config": {"n_embd": 8}})
    manager = CheckpointManager(tmp_path, max_checkpoints=2)
    assert manager.all_steps() == [1, 3, 4] and manager.best_step() == 1
    for step in manager.all_steps():
        for target in (abstract_state(), make_state(99)):
            restored = manager.restore(step, target)
            assert_states_identical(restored, states[step])
            assert type(restored.opt_state[1][0]) is optax.ScaleByAdamState
        metadata = manager.metadata(step)
        assert metadata["run_id"] == "abc" and metadata["config"] == {"n_embd": 8}
        assert metadata["versions"]["jax"] == jax.__version__
        assert set(metadata["versions"]) >= {"jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "python"}
        assert metadata["prng_keys"] == {"key": "threefry2x32"}
        assert metadata["val_loss"] == losses[step] and metadata["step"] == step
    latest = manager.restore(target=abstract_state())  # step=None: the latest
    assert_states_identical(latest, states[4])
    untyped = manager.restore(4)  # no target: plain containers, typed key still a key
    np.testing.assert_array_equal(jax.random.key_data(untyped["key"]), jax.random.key_data(states[4].key))
    manager.close()


def test_non_default_prng_impl_round_trips_and_mismatch_is_refused(tmp_path):
    state = make_state(5, key_impl="rbg")
    with CheckpointManager(tmp_path) as manager:
        manager.save(5, state)
        manager.wait_until_finished()
        assert manager.metadata(5)["prng_keys"] == {"key": "rbg"}
        assert_states_identical(manager.restore(5, abstract_state(key_impl="rbg")), state)
        with pytest.raises(CheckpointMismatchError, match=r"leaf 'key' .*key<rbg>.*key<fry>"):
            manager.restore(5, abstract_state())


def test_save_is_unaffected_by_donating_the_state_right_after(tmp_path):
    """The save holds host views of the device buffers, not copies: the step that donates the
    state must not write into them while they are on their way to disk."""
    def big_state():
        return {"w": jnp.arange(1 << 24, dtype=jnp.float32), "small": jnp.ones((3,), jnp.bfloat16),
                "key": jax.random.key(3)}

    overwrite = jax.jit(lambda s: {**s, "w": s["w"] * 0 - 1, "small": s["small"] * 0}, donate_argnums=0)
    jax.block_until_ready(overwrite(big_state()))  # compiled now, so that it runs during the save
    # On a busy machine (parallel test workers) the save may now and then finish before the
    # donating steps run; such an attempt proves nothing, so it is made again.
    for attempt in range(5):
        state = big_state()
        expected = {"w": np.arange(1 << 24, dtype=np.float32), "key": np.asarray(jax.random.key_data(state["key"]))}
        directory = tmp_path / str(attempt)
        with CheckpointManager(directory) as manager:
            manager.save(1, state)
            for _ in range(2):
                state = overwrite(state)
            jax.block_until_ready(state)
            raced = not (directory / "1").exists()
            manager.wait_until_finished()
            restored = manager.restore(1, jax.eval_shape(big_state))
        if raced:
            break
    assert raced, "every save was committed before the donation; the test proved nothing"
    assert np.asarray(state["w"])[5] == -1  # the donated steps did run
    np.testing.assert_array_equal(np.asarray(restored["w"]), expected["w"], strict=True)
    np.testing.assert_array_equal(np.asarray(restored["small"]), np.ones((3,), jnp.bfloat16), strict=True)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(restored["key"])), expected["key"], strict=True)


# ---- anomaly area ------------------------------------------------------------------------


def test_anomaly_saves_are_never_rotated(tmp_path):
    with CheckpointManager(tmp_path, max_checkpoints=1) as manager:
        assert manager.anomaly_steps() == []
        for step in range(6):
            manager.save(step, tiny_state(step), val_loss=None)
            if step % 2:
                manager.save_on_anomaly(step, tiny_state(100 + step), metadata={"reason": "nan_loss"})
        manager.save_on_anomaly(0, tiny_state(100))  # lower than the latest anomaly step: still saved
        manager.wait_until_finished()
        assert manager.all_steps() == [5]
        assert manager.anomaly_steps() == [0, 1, 3, 5]
    reopened = CheckpointManager(tmp_path, max_checkpoints=1)
    assert reopened.anomaly_steps() == [0, 1, 3, 5] and reopened.all_steps() == [5]
    restored = reopened.restore(3, jax.eval_shape(lambda: tiny_state(0)), anomaly=True)
    np.testing.assert_array_equal(restored["w"], np.full((4,), 103, np.float32))
    assert reopened.metadata(3, anomaly=True)["reason"] == "nan_loss"
    assert (tmp_path / "anomaly" / "3").is_dir()
    reopened.close()


# ---- damaged checkpoints, versions, shapes -----------------------------------------------


def corrupt_step(directory: Path, step: int) -> None:
    """Truncate the array file of a step's state (what a full disk or a bad copy leaves)."""
    with open(directory / str(step) / "state" / "state.safetensors", "r+b") as handle:
        handle.truncate(10)


def test_corrupt_step_gives_one_line_error_and_falls_back(tmp_path):
    states = {step: make_state(step) for step in (1, 2, 3)}
    with CheckpointManager(tmp_path) as manager:
        for step, state in states.items():
            manager.save(step, state, val_loss=1.0 / step)
    corrupt_step(tmp_path, 3)
    (tmp_path / "2" / "metadata" / "metadata").write_text("{not json")
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointCorruptError) as error:
        manager.restore(3, abstract_state())
    message = str(error.value)
    assert "\n" not in message and "step 3" in message and str(tmp_path / "3") in message and len(message) < 500
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, restored, metadata = manager.restore_latest_good(abstract_state())
    assert step == 1 and metadata["step"] == 1
    assert_states_identical(restored, states[1])
    fallback_warnings = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(fallback_warnings) == 2 and "step 3" in fallback_warnings[0] and "step 2" in fallback_warnings[1]
    assert all("\n" not in text for text in fallback_warnings)
    corrupt_step(tmp_path, 1)
    with pytest.raises(CheckpointCorruptError, match=r"no readable checkpoint .*\[3, 2, 1\]"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager.restore_latest_good(abstract_state())
    manager.close()
    with CheckpointManager(tmp_path / "empty") as empty:
        assert empty.restore_latest_good(abstract_state()) is None
        with pytest.raises(CheckpointError, match="no checkpoint to restore"):
            empty.restore(target=abstract_state())


def test_other_library_versions_warn_in_one_line(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, make_state(1))
    metadata_file = tmp_path / "1" / "metadata" / "metadata"
    saved = json.loads(metadata_file.read_text())
    saved["versions"]["jax"] = "0.0.1"
    metadata_file.write_text(json.dumps(saved))
    with CheckpointManager(tmp_path) as manager:
        with pytest.warns(CheckpointVersionWarning) as caught:
            restored = manager.restore(1, abstract_state())
    assert_states_identical(restored, make_state(1))
    message = str(caught[0].message)
    assert f"jax 0.0.1 -> {jax.__version__}" in message and "\n" not in message
    with CheckpointManager(tmp_path) as manager, warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged versions: no warning at all
        manager.save(2, make_state(2))
        manager.restore(2, abstract_state())


def test_changed_shapes_or_dtypes_are_refused(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, make_state(1, n_embd=8))
        manager.save(2, make_state(2, n_embd=8))
        with pytest.raises(CheckpointMismatchError, match=r"step 2 .* leaf '.*' is \(.*8.*\) float32 in the checkpoint but \(.*12.*\) float32"):
            manager.restore(2, abstract_state(n_embd=12))
        # a config error is not corruption: no fallback to older steps
        with pytest.raises(CheckpointMismatchError):
            manager.restore_latest_good(abstract_state(n_embd=12))
        wrong_dtype = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float16) if x.dtype == jnp.bfloat16 else x, abstract_state()
        )
        with pytest.raises(CheckpointMismatchError, match=r"quant_state.*bfloat16.*float16"):
            manager.restore(2, wrong_dtype)
        with pytest.raises(CheckpointMismatchError, match="structure differs"):
            manager.restore(2, {"params": abstract_state().params})


def test_a_checkpoint_from_before_the_three_slot_recipe_is_named_as_such(tmp_path):
    """quant_state was one weight scale and amax history per layer; now x/w/dy histories."""
    old = {"quant_state": {"h": {"0": {"c_fc": {"scale": jnp.float32(1.0), "amax_history": jnp.zeros((4,))}}}}}
    new = {"quant_state": {"h": {"0": {"c_fc": {slot: {"amax_history": jnp.zeros((4,))} for slot in ("x", "w", "dy")}}}}}
    save_checkpoint(tmp_path / "old", old)
    with pytest.raises(CheckpointMismatchError, match="before the three-slot FP8 recipe"):
        load_checkpoint(tmp_path / "old", jax.eval_shape(lambda: new))


def test_bad_calls_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="max_checkpoints"):
        CheckpointManager(tmp_path, max_checkpoints=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointManager(tmp_path / "file")
    with CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, tiny_state(5))
        with pytest.raises(CheckpointError, match="step 5 .* not after the latest saved step 5"):
            manager.save(5, tiny_state(5))
        with pytest.raises(CheckpointError, match="reserved"):
            manager.save(6, tiny_state(6), metadata={"versions": 1})
        with pytest.raises(CheckpointError, match="not JSON-serializable"):
            manager.save(6, tiny_state(6), metadata={"x": object()})
        with pytest.raises(CheckpointError, match=r"no step 4 among the checkpoints .*\[5\]"):
            manager.restore(4)


def test_one_off_save_and_load(tmp_path):
    state = make_state(3)
    save_checkpoint(tmp_path / "one", state, metadata={"note": "export"})
    assert_states_identical(load_checkpoint(tmp_path / "one", abstract_state()), state)
    assert load_checkpoint_metadata(tmp_path / "one")["note"] == "export"
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path / "one", state)
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(tmp_path / "one", abstract_state(n_embd=4))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing", abstract_state())


# ---- asynchronous failures and process faults --------------------------------------------


class FileSizeLimit:
    """Make every file write beyond `limit` bytes fail with EFBIG, as a full disk would."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.previous_limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.previous_limits[1]))

    def __exit__(self, *exc_info):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.previous_limits)
        signal.signal(signal.SIGXFSZ, self.previous_handler)


def incompressible_state(step):
    return {"w": jax.random.normal(jax.random.key(step), (1 << 20,)), "key": jax.random.key(step)}


def test_async_save_failure_surfaces_on_wait_and_keeps_old_steps(tmp_path):
    with CheckpointManager(tmp_path, max_checkpoints=1) as manager:
        manager.save(0, incompressible_state(0), val_loss=5.0)
        manager.save(1, incompressible_state(1), val_loss=4.0)
        manager.wait_until_finished()
        with FileSizeLimit(1 << 20):
            manager.save(2, incompressible_state(2), val_loss=1.0)  # returns before the write fails
            with pytest.raises(CheckpointError, match=r"asynchronous save of step 2 to .*/2 failed: .*") as error:
                manager.wait_until_finished()
        assert "\n" not in str(error.value)
        assert manager.all_steps() == [1] and manager.best_step() == 1  # not rotated away
        manager.save(3, incompressible_state(3), val_loss=6.0)  # the manager keeps working
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 3]
        np.testing.assert_array_equal(
            manager.restore(1, jax.eval_shape(lambda: incompressible_state(0)))["w"], incompressible_state(1)["w"]
        )
    assert CheckpointManager(tmp_path, max_checkpoints=1).all_steps() == [1, 3]


def test_async_save_failure_surfaces_on_next_save(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        with FileSizeLimit(1 << 20):
            manager.save(1, incompressible_state(1))
            with pytest.raises(CheckpointError, match=r"asynchronous save of step 1 .* failed"):
                manager.save(2, tiny_state(2))
        manager.save(2, tiny_state(2))
        manager.wait_until_finished()
        assert manager.all_steps() == [2]


def test_a_failed_save_is_reported_by_the_anomaly_save_that_follows(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        with FileSizeLimit(1 << 20):
            manager.save(1, incompressible_state(1), val_loss=1.0)
            with pytest.raises(CheckpointError, match=r"asynchronous save of step 1 .* failed"):
                manager.save_on_anomaly(2, tiny_state(2))
        manager.save_on_anomaly(2, tiny_state(2))
        assert manager.anomaly_steps() == [2] and manager.all_steps() == []


def test_a_closed_manager_refuses_to_save(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, tiny_state(1))
    manager.close()
    manager.close()  # twice is harmless
    with pytest.raises(CheckpointError, match="is closed"):
        manager.save(2, tiny_state(2))
    assert CheckpointManager(tmp_path).all_steps() == [1]


def data_bytes_under(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def start_writer(directory: Path, megabytes: int) -> subprocess.Popen:
    environment = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "_ckpt_writer.py"), str(directory), str(megabytes)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment,
    )
    assert process.stdout.readline().strip() == "saving 2", "writer did not reach the large save"
    return process


def wait_for_partial_write(directory: Path, process: subprocess.Popen, min_bytes: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        partial = list(directory.glob("2.orbax-checkpoint-tmp*"))
        if partial and data_bytes_under(partial[0]) >= min_bytes:
            return
        time.sleep(0.002)
    raise AssertionError("the large save never showed a partial write")


@pytest.mark.e2e
def test_sigkill_during_a_large_save_leaves_previous_step_restorable(tmp_path):
    process = start_writer(tmp_path, megabytes=256)
    try:
        wait_for_partial_write(tmp_path, process, min_bytes=16 << 20)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "2").exists(), "the save finished before the kill; the test proved nothing"
    assert list(tmp_path.glob("2.orbax-checkpoint-tmp*")), "the partial save should be on disk"
    with CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == [1] and manager.latest_step() == 1
        restored = manager.restore(target=jax.eval_shape(_ckpt_writer.small_state))
        expected = _ckpt_writer.small_state()
        np.testing.assert_array_equal(restored["w"], expected["w"])
        np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(expected["key"]))
        manager.save(2, _ckpt_writer.small_state())  # the killed step can be written again
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2]
    assert not list(tmp_path.glob("*.orbax-checkpoint-tmp*")), "leftovers were not cleaned up"


@pytest.mark.e2e
def test_sigterm_waits_for_the_save_in_flight_and_exits_non_zero(tmp_path):
    process = start_writer(tmp_path, megabytes=64)
    try:
        wait_for_partial_write(tmp_path, process, min_bytes=1)
        process.send_signal(signal.SIGTERM)
    finally:
        process.wait(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    with CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == [1, 2] and manager.best_step() == 2
        big = jax.eval_shape(lambda: _ckpt_writer.large_state(64))
        restored = manager.restore(2, big)
        np.testing.assert_array_equal(restored["w"][3], _ckpt_writer.large_state(64)["w"][3])


@pytest.mark.e2e
def test_a_second_signal_abandons_the_save_in_flight(tmp_path):
    process = start_writer(tmp_path, megabytes=512)
    try:
        wait_for_partial_write(tmp_path, process, min_bytes=1)
        process.send_signal(signal.SIGINT)  # stop at the next step boundary, then wait for the save
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # stop now
    finally:
        process.wait(timeout=60)
    assert process.returncode == 130
    assert not (tmp_path / "2").exists(), "the save finished before the second signal; the test proved nothing"
    with CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == [1]
        manager.save(2, _ckpt_writer.small_state())  # the abandoned step can be written again
    assert CheckpointManager(tmp_path).all_steps() == [1, 2]
    assert not list(tmp_path.glob("*.orbax-checkpoint-tmp*")), "the abandoned save was not cleaned up"


# ---- the real train state ----------------------------------------------------------------


def test_restored_train_state_gives_a_bitwise_equal_next_step(tmp_path):
    from altgrad_jax.config import TrainConfig
    from altgrad_jax.train_state import TrainState, abstract_train_state, init_train_state
    from altgrad_jax.train_step import make_train_step

    config = TrainConfig(
        n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, batch_size=4, dropout=0.1,
        warmup_steps=2, max_steps=10, use_fp8=True, fp8_format="E4M3", amax_history_len=4, seed=5,
    )
    rng = np.random.default_rng(0)
    batches = [
        (jnp.asarray(x), jnp.asarray(np.roll(x, -1, axis=1)))
        for x in rng.integers(0, config.vocab_size, (4, config.batch_size, config.block_size), dtype=np.int32)
    ]
    train_step = make_train_step(config)
    state = init_train_state(config)
    for batch in batches[:2]:
        state, _ = train_step(state, batch)
    with CheckpointManager(tmp_path) as manager:
        manager.save(2, state, val_loss=3.0, metadata={"config": config.to_dict()})
        for batch in batches[2:]:  # the uninterrupted run goes on (donating `state`) while it saves
            state, metrics = train_step(state, batch)
    uninterrupted = jax.device_get((state, metrics))

    with CheckpointManager(tmp_path) as manager:
        resumed_step, resumed, _ = manager.restore_latest_good(abstract_train_state(config))
    assert resumed_step == 2 and isinstance(resumed, TrainState) and int(resumed.step) == 2
    assert type(resumed.opt_state) is type(init_train_state(config).opt_state)
    for batch in batches[2:]:
        resumed, resumed_metrics = train_step(resumed, batch)
    assert_states_identical(jax.device_get(resumed), uninterrupted[0])
    for name, value in uninterrupted[1].items():
        np.testing.assert_array_equal(np.asarray(resumed_metrics[name]), np.asarray(value), err_msg=name)
