"""The research train step: shadow agreement, FP8 effects, quant state, determinism, learning, NaN."""

import functools
import hashlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from altgrad_jax.ckpt import load_checkpoint, save_checkpoint

from altgrad_jax.config import TrainConfig
from altgrad_jax.train_state import TrainState, abstract_train_state, init_train_state
from altgrad_jax.train_step import ModelLoss, make_eval_step, make_train_step, step_keys

BASE = TrainConfig(
    n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=32, batch_size=8, dropout=0.1,
    learning_rate=1e-2, warmup_steps=5, max_steps=200, use_shadow=True, seed=3,
)
E5M2 = BASE.replace(use_fp8=True, fp8_format="E5M2")


def _random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config.vocab_size, (config.batch_size, config.block_size), dtype=np.int32)
    return jnp.asarray(x), jnp.asarray(np.roll(x, -1, axis=1))


def _pattern_batch(config):
    """Every row is a shifted copy of one fixed random sequence of period 7: learnable."""
    period = np.random.default_rng(1).integers(0, config.vocab_size, 7)
    rows = [np.resize(np.roll(period, -r), config.block_size + 1) for r in range(config.batch_size)]
    data = np.stack(rows).astype(np.int32)
    return jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])


def _to_numpy(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a), tree)


def _params_hash(params) -> str:
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def e5m2_step():
    return make_train_step(E5M2)


def test_without_fp8_the_shadow_agrees_exactly():
    config = BASE.replace(use_fp8=False)
    _, metrics = make_train_step(config)(init_train_state(config), _random_batch(config))
    cosines = {k: float(v) for k, v in metrics.items() if k.startswith("grad_cos_sim/")}
    assert len(cosines) > 20
    for name, value in cosines.items():
        assert abs(value - 1.0) <= 1e-6, name
    assert float(metrics["shadow_loss"]) == float(metrics["loss"])
    assert "overflow_rate" not in metrics and "bit_stall_rate" not in metrics
    assert float(metrics["zero_update_frac"]) < 0.01  # logged in float32 runs too


def test_every_slot_off_is_the_plain_float32_step():
    plain = BASE.replace(use_fp8=False)
    off = BASE.replace(use_fp8=True, fp8_layer_rules=[{"match": "*", "format": "FP32"}])
    batch = _random_batch(BASE)
    plain_state, plain_metrics = make_train_step(plain)(init_train_state(plain), batch)
    off_state, off_metrics = make_train_step(off)(init_train_state(off), batch)
    assert plain_metrics.keys() == off_metrics.keys()
    for name in plain_metrics:
        assert float(off_metrics[name]) == float(plain_metrics[name]), name
    for a, b in zip(jax.tree_util.tree_leaves(plain_state.params), jax.tree_util.tree_leaves(off_state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(abs(float(v) - 1.0) <= 1e-6 for k, v in off_metrics.items() if k.startswith("grad_cos_sim/"))


def _head_kernel_gradient(config, batch):
    state = init_train_state(config)
    loss_fn = ModelLoss(config)
    dropout_key, rounding_key = step_keys(state)
    grads = jax.jit(jax.grad(loss_fn.quantized))(state.params, loss_fn.plan.zero_probes(), state.quant_state, batch,
                                        dropout_key, rounding_key)
    return np.asarray(grads["lm_head"]["kernel"])


def test_the_gradient_format_reaches_the_weight_gradient():
    batch = _random_batch(BASE)
    e5m2 = _head_kernel_gradient(BASE.replace(use_fp8=True, fp8_backward_format="E5M2", fp8_scaling="none"), batch)
    off = _head_kernel_gradient(BASE.replace(use_fp8=True, quantize_gradients=False, fp8_scaling="none"), batch)
    e3m4 = _head_kernel_gradient(BASE.replace(use_fp8=True, fp8_backward_format="E3M4", fp8_scaling="none"), batch)
    assert not np.array_equal(e5m2, off) and not np.array_equal(e3m4, off) and not np.array_equal(e5m2, e3m4)
    # Raw range (no scaling): dy of order 1e-4 is below E3M4's smallest subnormal 2^-6, so it all flushes.
    assert np.all(e3m4 == 0) and np.any(off != 0)


def test_fp8_changes_gradients_and_e7m0_agrees_less_than_e5m2(e5m2_step):
    batch = _random_batch(BASE)
    _, e5m2 = e5m2_step(init_train_state(E5M2), batch)
    e7m0_config = BASE.replace(use_fp8=True, fp8_format="E7M0")
    _, e7m0 = make_train_step(e7m0_config)(init_train_state(e7m0_config), batch)
    assert float(e5m2["loss"]) != float(e5m2["shadow_loss"])
    assert float(e5m2["grad_cos_sim/min"]) < 1.0
    assert float(e5m2["grad_cos_sim/mean"]) > 0.9
    assert float(e7m0["grad_cos_sim/mean"]) < float(e5m2["grad_cos_sim/mean"]) - 0.05
    for metrics in (e5m2, e7m0):
        for name in ("overflow_rate", "underflow_rate", "bit_stall_rate", "zero_update_frac",
                     "quant/overflow/x/lm_head", "quant/underflow/dy/h/0/mlp/c_fc", "quant/rel_err/w/lm_head",
                     "overflow_rate/dy", "underflow_rate/x", "quant/bit_stall/h/1/attn/c_proj"):
            assert 0.0 <= float(metrics[name]) <= 1.0, name
        assert all(np.isfinite(float(v)) for v in metrics.values())


def test_quant_state_records_amax_and_round_trips(e5m2_step, tmp_path):
    state = init_train_state(E5M2)
    kernel = np.array(state.params["h"][0]["mlp"]["c_fc"]["kernel"])
    state, _ = e5m2_step(state, _random_batch(E5M2))
    entry = state.quant_state["h"][0]["mlp"]["c_fc"]
    history = np.asarray(entry["w"]["amax_history"])
    assert history[0] == np.abs(kernel).max()  # amax of the kernel this step quantized
    np.testing.assert_array_equal(history[1:], 0.0)
    assert all(float(entry[slot]["amax_history"][0]) > 0 for slot in ("x", "dy"))

    # The next step reads the recorded state: its history is pushed, newest first.
    kernel_1 = np.array(state.params["h"][0]["mlp"]["c_fc"]["kernel"])
    state, _ = e5m2_step(state, _random_batch(E5M2, seed=1))
    history = np.asarray(state.quant_state["h"][0]["mlp"]["c_fc"]["w"]["amax_history"])
    np.testing.assert_array_equal(history[:2], [np.abs(kernel_1).max(), np.abs(kernel).max()])

    # Round trip through a real checkpoint: the quant state comes back exactly.
    save_checkpoint(tmp_path / "ckpt", state)
    restored = load_checkpoint(tmp_path / "ckpt", abstract_train_state(E5M2))
    assert isinstance(restored, TrainState)
    for a, b in zip(jax.tree_util.tree_leaves(state.quant_state), jax.tree_util.tree_leaves(restored.quant_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_twenty_steps_are_bitwise_reproducible(e5m2_step):
    hashes = []
    for _ in range(2):
        state = init_train_state(E5M2)
        for step in range(20):
            state, _ = e5m2_step(state, _random_batch(E5M2, seed=step))
        hashes.append(_params_hash(state.params) + _params_hash(state.quant_state))
    assert hashes[0] == hashes[1]
    assert _params_hash(init_train_state(E5M2).params) != hashes[0][:64]


def test_training_on_a_repeated_pattern_reduces_the_loss(e5m2_step):
    batch = _pattern_batch(E5M2)
    state = init_train_state(E5M2)
    losses = []
    for _ in range(60):
        state, metrics = e5m2_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] <= 0.7 * losses[0], (losses[0], losses[-1])
    eval_loss = float(make_eval_step(E5M2)(state, batch)["loss"])
    assert eval_loss <= 0.7 * losses[0]


def test_nan_in_one_weight_is_reported_without_exception(e5m2_step):
    state = init_train_state(E5M2)
    kernel = state.params["h"][1]["attn"]["c_proj"]["kernel"]
    params = jax.tree_util.tree_map(lambda a: a, state.params)
    params["h"][1]["attn"]["c_proj"]["kernel"] = kernel.at[3, 4].set(jnp.nan)
    poisoned = state.replace(params=params)
    expected = jax.tree_util.tree_map(np.array, (poisoned.params, poisoned.opt_state, poisoned.quant_state))
    after, metrics = e5m2_step(poisoned, _random_batch(E5M2))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(metrics["param_nan_count"]) == 1
    assert int(metrics["param_inf_count"]) == 0
    # The update is skipped: the state that produced the NaN is kept (one NaN, not a NaN model).
    assert float(metrics["update_skipped"]) == 1.0 and int(after.step) == 1
    for kept, before in zip(jax.tree_util.tree_leaves((after.params, after.opt_state, after.quant_state)),
                            jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(kept), before)


def _at(tree, name):
    for key in name.split("/"):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


def _np_quantize_e5m2(x, scale):
    x = np.clip(x * (np.float32(1) / scale), -57344.0, 57344.0)
    return x.astype(ml_dtypes.float8_e5m2).astype(np.float32)


def test_bit_stall_rate_matches_numpy_recomputation(e5m2_step):
    state = init_train_state(E5M2)
    batch = _random_batch(E5M2, seed=5)
    old_params, old_quant = _to_numpy(state.params), _to_numpy(state.quant_state)
    # The gradient mask: the same quantized loss and keys the step uses.
    loss_fn = ModelLoss(E5M2)
    grads = _to_numpy(jax.grad(loss_fn.quantized)(state.params, loss_fn.plan.zero_probes(), state.quant_state,
                                                  batch, *step_keys(state)))
    new_state, metrics = e5m2_step(state, batch)
    new_params = _to_numpy(new_state.params)

    stalled_total = moving_total = 0
    names = ["lm_head"] + [f"h/{i}/{m}" for i in range(2) for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")]
    for name in names:
        get = functools.partial(_at, name=name)
        # The first step's w scale: the history is empty, so the kernel's own amax (current).
        scale = np.float32(np.abs(get(old_params)["kernel"]).max() * np.float32(1.05)) * np.float32(1 / 57344.0)
        before = _np_quantize_e5m2(get(old_params)["kernel"], scale)
        after = _np_quantize_e5m2(get(new_params)["kernel"], scale)
        moving = get(grads)["kernel"] != 0
        stalled = np.sum(moving & (before == after))
        assert float(metrics[f"quant/bit_stall/{name}"]) == pytest.approx(stalled / moving.sum(), abs=1e-6), name
        stalled_total, moving_total = stalled_total + stalled, moving_total + moving.sum()
    assert 0.0 < stalled_total / moving_total < 1.0
    assert float(metrics["bit_stall_rate"]) == pytest.approx(stalled_total / moving_total, abs=1e-6)
    unchanged = sum(np.sum(a == b) for a, b in zip(jax.tree_util.tree_leaves(old_params),
                                                    jax.tree_util.tree_leaves(new_params)))
    total = sum(a.size for a in jax.tree_util.tree_leaves(old_params))
    assert float(metrics["zero_update_frac"]) == pytest.approx(unchanged / total, abs=1e-6)


def test_weight_overflow_under_a_stale_delayed_scale_is_counted(e5m2_step):
    state = init_train_state(E5M2)
    state, _ = e5m2_step(state, _random_batch(E5M2))  # records amax(W) in the w history
    params = jax.tree_util.tree_map(lambda a: a, state.params)
    grown = np.array(params["h"][0]["mlp"]["c_fc"]["kernel"]) * 3.0  # the history still fits the old weights
    params["h"][0]["mlp"]["c_fc"]["kernel"] = jnp.asarray(grown)
    recorded = np.asarray(state.quant_state["h"][0]["mlp"]["c_fc"]["w"]["amax_history"]).max()
    scale = np.float32(recorded * np.float32(1.05)) * np.float32(1 / 57344.0)
    _, metrics = e5m2_step(state.replace(params=params), _random_batch(E5M2, seed=1))
    saturated = np.sum(np.abs(grown * (np.float32(1) / scale)) > 57344.0)
    assert saturated > 0
    assert float(metrics["quant/overflow/w/h/0/mlp/c_fc"]) == pytest.approx(saturated / grown.size, rel=1e-6)
    assert float(metrics["quant/overflow/w/h/1/mlp/c_fc"]) == 0.0
    assert float(metrics["overflow_rate/w"]) > 0.0 and float(metrics["overflow_rate"]) > 0.0


def test_hardware_gemm_path_matches_the_simulated_one():
    # On the CPU the float8 operands are upcast: the same numbers as the simulated dot.
    simulated = BASE.replace(use_fp8=True, fp8_forward_format="E4M3", fp8_backward_format="E5M2", dropout=0.0)
    hardware = simulated.replace(fp8_hardware_gemm=True)
    state, batch = init_train_state(simulated), _random_batch(BASE)
    loss_sim = float(make_eval_step(simulated)(state, batch)["loss"])
    loss_hw = float(make_eval_step(hardware)(state, batch)["loss"])
    assert loss_hw == pytest.approx(loss_sim, rel=1e-5)
    assert loss_sim != float(make_eval_step(BASE)(state, batch)["loss"])  # quantization did act
    with pytest.raises(ValueError, match="E5M2 x E5M2"):
        make_train_step(BASE.replace(use_fp8=True, fp8_hardware_gemm=True))
