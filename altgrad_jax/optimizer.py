"""The optimizer: global-norm clipping and AdamW (weight decay on matrices only), linear warmup then
cosine decay, and the low-precision storage of weights and moments (altgrad_jax.update)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from altgrad_jax.update import gradient_preconditioned, low_precision_moments, stored_weight_update, ulp_scaled

_UPDATE_ROUNDING_STREAM = 0x0DD5  # the stochastic rounding key of the weight update, from the seed


def make_schedule(config):
    """nanoGPT's schedule: lr * (step + 1) / warmup for step < warmup, then cosine from lr down to
    lr * min_lr_ratio at max_steps, constant afterwards. Step 0 already takes a (small) step."""
    peak = config.learning_rate
    floor = config.learning_rate * config.min_lr_ratio
    warmup = config.warmup_steps
    decay_span = max(config.max_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1.0) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_span, 0.0, 1.0)
        cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """Weight decay on matrices (kernels and embeddings), not on biases and LayerNorm scales."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) (skipped when grad_clip <= 0), then the update rule (AdamW;
    or in ULPs of the stored weight; or the earlier bench's gradient-preconditioned AdamW), with
    the Adam moments stored as `opt_state_dtype`, and the params as `master_weights`."""
    schedule = make_schedule(config)
    adam_args = dict(b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay, mask=decay_mask)
    if config.update_rule == "ulp":
        rule = ulp_scaled(schedule, config.master_weights, **adam_args)
    elif config.update_rule == "preconditioned":
        rule = gradient_preconditioned(schedule, config.master_weights, **adam_args)
    else:
        rule = optax.adamw(schedule, **adam_args)
    if config.opt_state_dtype != "float32":
        rule = low_precision_moments(rule, config.opt_state_dtype)
    if config.grad_clip and config.grad_clip > 0:
        rule = optax.chain(optax.clip_by_global_norm(config.grad_clip), rule)
    if config.master_weights == "float32":
        return rule
    rounding_key = jax.random.fold_in(jax.random.key(config.seed), _UPDATE_ROUNDING_STREAM)
    return stored_weight_update(rule, config.master_weights, config.update_rounding, config.kahan,
                                key=rounding_key, metrics=True)


def applied_learning_rate(schedule, opt_state) -> jax.Array:
    """The rate the next `update` applies (in ULPs under update_rule ulp): the schedule at the
    count of the transformation that reads it, which does not advance on a skipped update
    (unlike TrainState.step)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    for holder in ("ScaleByScheduleState", "ScaleByUlpState"):
        counts = [count for path, count in found if getattr(path[-1], "tuple_name", None) == holder]
        if counts:
            return schedule(counts[0])
    raise ValueError("no schedule count in the optimizer state")
