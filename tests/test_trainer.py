"""trainer.train in process: the anomaly checkpoint holds exactly the state that produced the first
non-finite loss, although the host reads each step's metrics one step late."""

import math

import jax
import numpy as np
import pytest

from altgrad_jax.ckpt import CheckpointManager
from altgrad_jax.config import TrainConfig
from altgrad_jax.data import get_batch, load_dataset
from altgrad_jax.loop import trainer
from altgrad_jax.loop.local_tracker import read_jsonl
from altgrad_jax.sharding import make_mesh, put_batch, put_state
from altgrad_jax.train_state import abstract_train_state, init_train_state
from altgrad_jax.train_step import make_train_step

POISONED = 5  # batch index whose step, POISONED + 1, gets a non-finite loss


def tiny_config(text_file, out_dir, **fields) -> TrainConfig:
    fields = {"checkpoint_interval": 1000, **fields}
    return TrainConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=8, eval_iters=1,
                       eval_interval=1000, warmup_steps=2, learning_rate=3e-3, use_fp8=True,
                       max_steps=POISONED + 4, data=str(text_file), out_dir=str(out_dir), project="",
                       **fields)


def batch(config, dataset, index):
    """The trainer's batch `index`; the poisoned one holds a token id past the vocabulary, whose
    embedding lookup (jnp.take fills out-of-range rows with NaN) makes the loss NaN."""
    x, y = get_batch(dataset.train, seed=config.seed, step=index, batch_size=config.batch_size,
                     block_size=config.block_size)
    if index == POISONED:
        x = x.copy()
        x[0, 0] = config.vocab_size
    return x, y


def leaves_bytes(tree) -> list[tuple[str, tuple, bytes]]:
    return [(str(np.asarray(leaf).dtype), np.shape(leaf), np.asarray(leaf).tobytes())
            for leaf in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file):
    """The same steps without the loop: the state after POISONED steps (which produced the
    non-finite loss of step POISONED + 1), and the params after two more steps."""
    config = tiny_config(text_file, tmp_path_factory.mktemp("unused"))
    dataset = load_dataset(config.data, vocab_size=config.vocab_size, block_size=config.block_size)
    mesh = make_mesh(config.mesh, config.batch_size)
    train_step = make_train_step(config)
    state = put_state(init_train_state(config), mesh)
    for index in range(POISONED):
        state, _ = train_step(state, put_batch(batch(config, dataset, index), mesh))
    producer = jax.device_get(state)
    state, metrics = train_step(state, put_batch(batch(config, dataset, POISONED), mesh))
    assert not math.isfinite(float(metrics["loss"])) and float(metrics["update_skipped"]) == 1.0, \
        "the poisoned batch no longer gives a non-finite loss; the test needs another NaN source"
    state, metrics = train_step(state, put_batch(batch(config, dataset, POISONED + 1), mesh))
    assert float(metrics["update_skipped"]) == 0.0
    return producer, jax.device_get(state.params)


@pytest.mark.parametrize("nan_patience, checkpoint_interval, exit_code", [
    (3, 1000, trainer.EXIT_OK),                      # one bad step: logged one step late, run goes on
    (1, POISONED + 1, trainer.EXIT_NAN_STOP),        # stops at once, on a step published without delay
])
def test_anomaly_checkpoint_is_the_state_that_produced_the_first_nonfinite_loss(
        tmp_path, text_file, monkeypatch, reference, nan_patience, checkpoint_interval, exit_code):
    producer, params_two_steps_later = reference
    config = tiny_config(text_file, tmp_path / "run", nan_patience=nan_patience,
                         checkpoint_interval=checkpoint_interval)
    dataset = load_dataset(config.data, vocab_size=config.vocab_size, block_size=config.block_size)
    mesh = make_mesh(config.mesh, config.batch_size)
    monkeypatch.setattr(trainer, "get_batch", lambda tokens, *, step, **_: batch(config, dataset, step))

    status = trainer.train(config, dataset, mesh, put_state(init_train_state(config), mesh), 0, {})

    assert status == exit_code
    logged = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r}
    bad = [s for s, r in logged.items() if not math.isfinite(r["loss"])]
    assert bad == [POISONED + 1] and logged[POISONED + 1]["update_skipped"] == 1.0
    with CheckpointManager(config.checkpoint_path) as manager:
        assert manager.anomaly_steps() == [POISONED + 1]
        saved = manager.restore(POISONED + 1, abstract_train_state(config), anomaly=True)
    assert int(saved.step) == POISONED + 1  # the skipped step still advanced the counter
    for part in ("params", "opt_state", "quant_state"):
        assert leaves_bytes(getattr(saved, part)) == leaves_bytes(getattr(producer, part)), part
    # The step after the bad one updated the params: saving one step late would have caught those.
    assert leaves_bytes(params_two_steps_later) != leaves_bytes(producer.params)
