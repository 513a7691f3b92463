"""AdamW with weight decay on matrices only, linear warmup then cosine decay, global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
    """clip_by_global_norm(grad_clip) (skipped when grad_clip <= 0) followed by AdamW."""
    adamw = optax.adamw(
        make_schedule(config), b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay, mask=decay_mask
    )
    if config.grad_clip and config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
