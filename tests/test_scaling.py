"""Delayed, current and no scaling: the scale arithmetic, the amax histories in the quant state,
and that step t quantizes with amaxes from steps < t only (x, w and dy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altgrad_jax.config import TrainConfig
from altgrad_jax.model import cross_entropy_loss
from altgrad_jax.quant import FORMATS
from altgrad_jax.quant.scaling import delayed_scale, push_amax, resolve_scale
from altgrad_jax.train_state import init_train_state, model_structure
from altgrad_jax.train_step import make_train_step
from tests._reference import reference_quantize

MARGIN = 1.05
# Only lm_head is quantized, so its input is the float32 forward's and NumPy can recount it.
CONFIG = TrainConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=48, batch_size=4,
                     use_fp8=True, fp8_forward_format="E4M3", fp8_backward_format="E5M2",
                     fp8_layer_rules=[{"match": "h/*", "format": "FP32"}], fp8_amax_margin=MARGIN,
                     amax_history_len=4, learning_rate=1e-3, warmup_steps=0, max_steps=10)


def test_delayed_scale_uses_the_largest_finite_amax_and_reports_an_empty_history_as_zero():
    fmt = FORMATS["E4M3"]
    assert float(delayed_scale(jnp.asarray([1.0, 3.0, 2.0]), fmt, MARGIN)) == pytest.approx(3.0 * MARGIN / 448)
    assert float(delayed_scale(jnp.asarray([np.nan, 2.0, np.inf]), fmt, 1.0)) == pytest.approx(2.0 / 448)
    for empty in ([0.0, 0.0], [np.nan, 0.0], [np.inf, np.nan]):
        assert float(delayed_scale(jnp.asarray(empty, jnp.float32), fmt, MARGIN)) == 0.0


def test_resolve_scale_per_mode():
    t = jnp.asarray([0.5, -8.0, 2.0])
    current = 8.0 * MARGIN / 448
    assert float(resolve_scale("none", 0.25, t, "E4M3", MARGIN)) == 1.0
    assert float(resolve_scale("current", 0.25, t, "E4M3", MARGIN)) == pytest.approx(current)
    assert float(resolve_scale("delayed", 0.25, t, "E4M3", MARGIN)) == 0.25
    assert float(resolve_scale("delayed", 0.0, t, "E4M3", MARGIN)) == pytest.approx(current)  # not known yet


def test_push_amax_is_newest_first():
    history = push_amax(push_amax(jnp.zeros(3), 2.0), 4.0)
    np.testing.assert_array_equal(np.asarray(history), [4.0, 2.0, 0.0])
    np.testing.assert_array_equal(np.asarray(push_amax(push_amax(history, 1.0), 5.0)), [5.0, 1.0, 4.0])


def test_quant_state_has_every_slot_of_every_layer_whatever_the_config():
    plain = init_train_state(CONFIG.replace(use_fp8=False)).quant_state
    fp8 = init_train_state(CONFIG).quant_state
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(fp8)
    assert set(fp8["lm_head"]) == {"x", "w", "dy"} and set(fp8["h"][0]["mlp"]["c_fc"]) == {"x", "w", "dy"}
    assert fp8["lm_head"]["dy"]["amax_history"].shape == (4,)


def _batch(seed=0):
    x = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (CONFIG.batch_size, CONFIG.block_size))
    return jnp.asarray(x, jnp.int32), jnp.asarray(np.roll(x, -1, axis=1), jnp.int32)


def _head_operands(state, batch):
    """(input activation of lm_head [B*T, C], its kernel, d loss / d logits) in float32, with the
    forward of the unquantized blocks and NumPy-quantized head operands at `scales`."""
    graphdef, _ = model_structure(CONFIG)
    model = nnx.merge(graphdef, state.params)
    x, _ = batch
    hidden = model.wte(x) + model.wpe(jnp.arange(x.shape[1]))[None]
    for block in model.h:
        hidden = block(hidden)
    features = np.asarray(model.ln_f(hidden)).reshape(-1, CONFIG.n_embd)
    return features, np.asarray(state.params["lm_head"]["kernel"])


def _with_history(state, slot, values):
    quant_state = jax.tree_util.tree_map(lambda a: a, state.quant_state)
    quant_state["lm_head"][slot] = {"amax_history": jnp.asarray(values, jnp.float32)}
    return state.replace(quant_state=quant_state)


def test_step_quantizes_with_earlier_amaxes_and_counts_the_overflow_of_a_jump():
    state, batch = init_train_state(CONFIG), _batch()
    features, kernel = _head_operands(state, batch)
    x_amax, w_amax = np.abs(features).max(), np.abs(kernel).max()
    # Hand-made histories: earlier steps saw a 4x smaller activation amax, and a w amax of half.
    x_history = [x_amax / 4, x_amax / 5, 0.0, 0.0]
    state = _with_history(_with_history(state, "x", x_history), "w", [w_amax / 2, 0.0, 0.0, 0.0])
    new_state, metrics = make_train_step(CONFIG)(state, batch)

    x_scale = np.float32(np.float32(x_amax / 4) * np.float32(MARGIN)) * np.float32(1 / 448)
    x_scaled = np.abs(features * (np.float32(1) / x_scale))
    assert float(metrics["quant/overflow/x/lm_head"]) == pytest.approx(np.sum(x_scaled > 448) / features.size, rel=1e-6)
    assert np.sum(x_scaled > 448) > 0
    w_scale = np.float32(np.float32(w_amax / 2) * np.float32(MARGIN)) * np.float32(1 / 448)
    w_over = np.sum(np.abs(kernel * (np.float32(1) / w_scale)) > 448)
    assert float(metrics["quant/overflow/w/lm_head"]) == pytest.approx(w_over / kernel.size, rel=1e-6) and w_over > 0
    # The histories now start with this step's amaxes, the older entries shifted by one.
    x_new = np.asarray(new_state.quant_state["lm_head"]["x"]["amax_history"])
    assert x_new[0] == x_amax and list(x_new[1:]) == list(np.float32(x_history[:3]))
    assert np.asarray(new_state.quant_state["lm_head"]["w"]["amax_history"])[0] == w_amax

    # dy: d loss / d logits of the quantized head, recomputed, then quantized at its delayed scale.
    logits = reference_quantize(features, FORMATS["E4M3"], x_scale) @ reference_quantize(kernel, FORMATS["E4M3"], w_scale)
    targets = np.asarray(batch[1]).reshape(-1)
    dy = np.asarray(jax.grad(lambda z: cross_entropy_loss(z, jnp.asarray(targets)))(jnp.asarray(logits)))
    dy_new = np.asarray(new_state.quant_state["lm_head"]["dy"]["amax_history"])
    assert dy_new[0] == pytest.approx(np.abs(dy).max(), rel=1e-5) and dy_new[0] > 0
    assert float(metrics["quant/overflow/dy/lm_head"]) == 0.0  # first step: dy's history was empty


def test_stale_dy_history_saturates_dy_and_current_scaling_never_overflows():
    state, batch = init_train_state(CONFIG), _batch(1)
    step = make_train_step(CONFIG)
    state, _ = step(state, batch)
    dy_amax = float(state.quant_state["lm_head"]["dy"]["amax_history"][0])
    stale = _with_history(state, "dy", [dy_amax / 8, 0.0, 0.0, 0.0])
    _, metrics = step(jax.tree_util.tree_map(jnp.copy, stale), batch)
    assert float(metrics["quant/overflow/dy/lm_head"]) > 0.0
    current = CONFIG.replace(fp8_scaling="current")
    _, metrics = make_train_step(current)(jax.tree_util.tree_map(jnp.copy, stale), batch)
    for role in ("x", "w", "dy"):
        assert float(metrics[f"quant/overflow/{role}/lm_head"]) == 0.0
        assert float(metrics[f"overflow_rate/{role}"]) == 0.0
