"""The research train step: quantized loss and gradients, FP32 shadow and every metric, one jit.

Each quantized linear layer runs `layer_matmul` (quant/matmul.py) with this step's inputs from
`QuantPlan`; one `value_and_grad` with respect to the params and the plan's zero probes returns
the gradients and every layer's quantization statistics (x, w and dy). With `use_shadow` a second
`value_and_grad` of the same loss with quantization off (same params, batch and dropout key) is
the float32 reference. Metric definitions: README ("The model and the step") and the modules
that compute them (metrics.py, quant/metrics.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from altgrad_jax.metrics import compute_gradient_stats, compute_stability_metrics, gradient_cosine_similarity
from altgrad_jax.model import cross_entropy_loss
from altgrad_jax.optimizer import applied_learning_rate, make_optimizer, make_schedule
from altgrad_jax.quant.metrics import bit_stall_metrics, quantization_metrics, whatif_metrics
from altgrad_jax.quant.plan import QuantPlan
from altgrad_jax.train_state import TrainState, model_structure
from altgrad_jax.update.master import to_float32, to_state

_ROUNDING_STREAM = 0x51A7  # folded into the step key: rounding draws apart from dropout's


class ModelLoss:
    """Mean cross entropy of the GPT on a batch, quantized by the per-layer inputs it is given."""

    def __init__(self, config):
        self.graphdef, abstract_params = model_structure(config)
        self.plan = QuantPlan(config, abstract_params)

    def __call__(self, params, layer_inputs, batch, dropout_key):
        """`params`: float32 values (update.master.to_float32 of the state's params)."""
        x, y = batch
        model = nnx.merge(self.graphdef, params)
        return cross_entropy_loss(model(x, dropout_key=dropout_key, quant=layer_inputs), y)

    def quantized(self, params, probes, quant_state, batch, dropout_key, rounding_key, whatif_active=None):
        inputs = self.plan.layer_inputs(quant_state, rounding_key, probes, whatif_active=whatif_active)
        return self(params, inputs, batch, dropout_key)


def step_keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
    """(dropout key, rounding key) of this step: pure functions of the state's key and step."""
    step_key = jax.random.fold_in(state.key, state.step)
    return step_key, jax.random.fold_in(step_key, _ROUNDING_STREAM)


def whatif_step(config, step) -> jax.Array | None:
    """True when the step that `step` steps precede is logged as a multiple of whatif_interval
    (as evaluations are); whatif/* metrics are zeros on the other steps, which the loop drops."""
    return None if config.whatif_interval <= 0 else (step + 1) % config.whatif_interval == 0


def zero_update_frac(old_params, new_params) -> jax.Array:
    """Fraction of all parameter elements left bitwise unchanged by the update."""
    same = jax.tree_util.tree_map(lambda a, b: jnp.sum(a == b, dtype=jnp.float32), old_params, new_params)
    return sum(jax.tree_util.tree_leaves(same)) / sum(leaf.size for leaf in jax.tree_util.tree_leaves(old_params))


def stored_update_metrics(opt_state) -> dict:
    """update/* of the last update, kept by stored_weight_update (narrow master_weights only)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "metrics")
    return dict(found[0][1]) if found else {}


def make_train_step(config):
    """Jitted `step(state, batch) -> (state, metrics)`; `state` is donated. jit follows the
    shardings of its inputs (sharding.py), so every reduction is over the global batch."""
    loss_fn = ModelLoss(config)
    plan, optimizer, schedule = loss_fn.plan, make_optimizer(config), make_schedule(config)

    def step(state: TrainState, batch):
        dropout_key, rounding_key = step_keys(state)
        old_params = to_float32(state.params, config.master_weights)
        if plan.layers:
            loss, (grads, stats) = jax.value_and_grad(loss_fn.quantized, argnums=(0, 1))(
                old_params, plan.zero_probes(), state.quant_state, batch, dropout_key, rounding_key,
                whatif_step(config, state.step))
        else:
            (loss, grads), stats = jax.value_and_grad(loss_fn)(old_params, None, batch, dropout_key), {}
        metrics = {"loss": loss, "learning_rate": applied_learning_rate(schedule, state.opt_state)}
        metrics |= compute_gradient_stats(grads, config.dead_neuron_threshold)
        metrics |= compute_stability_metrics(old_params)
        if config.use_shadow:
            metrics["shadow_loss"], shadow_grads = jax.value_and_grad(loss_fn)(old_params, None, batch, dropout_key)
            metrics |= gradient_cosine_similarity(grads, shadow_grads)

        updates, opt_state = optimizer.update(grads, state.opt_state, old_params)
        params = optax.apply_updates(old_params, updates)
        quant_state = plan.updated_state(state.quant_state, stats)
        metrics |= quantization_metrics(plan.layers, stats) | whatif_metrics(plan.layers, stats)
        metrics |= bit_stall_metrics(plan, state.quant_state, old_params, params, grads)
        metrics["zero_update_frac"] = zero_update_frac(old_params, params)
        metrics |= stored_update_metrics(opt_state)
        params = to_state(params, config.master_weights)

        # A non-finite loss or gradient keeps params, optimizer and quant state as they were (the
        # step counter still advances), so the state that produced it stays inspectable.
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        metrics["update_skipped"] = (~finite).astype(jnp.float32)
        params, opt_state, quant_state = jax.lax.cond(
            finite, lambda: (params, opt_state, quant_state),
            lambda: (state.params, state.opt_state, state.quant_state))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, quant_state=quant_state), metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(config):
    """Jitted `eval(state, batch) -> {"loss": ...}`: dropout off, quantized forward (nearest
    rounding) when any layer is quantized."""
    loss_fn = ModelLoss(config)

    def evaluate(state: TrainState, batch):
        inputs = loss_fn.plan.layer_inputs(state.quant_state, state.key, evaluating=True) if loss_fn.plan.layers else None
        return {"loss": loss_fn(to_float32(state.params, config.master_weights), inputs, batch, None)}

    return jax.jit(evaluate)
