"""Gradient and parameter health metrics over pytrees.

Every function is pure and jittable, makes no host syncs, and returns a flat dict
of scalar arrays whose names come from the tree key paths (`tree_names.key_path_name`).
Counts (`param_nan_count`, `param_inf_count`) are int32 so they stay exact above
2**24 elements; everything else is float32 (float64 for float64 leaves).
Each statistic is written in its plain exact form; benchmarks/README.md says what
the CPU-specific formulations it replaced cost and saved.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax import tree_util

from altgrad_jax.tree_names import key_path_name

# An SNR is reported as 0 when the population std is at or below this.
SNR_STD_FLOOR = 1e-10
# Plain Σx² at or above this (2**-100) is accurate; below it, or not finite, leaves are rescaled.
_PLAIN_SUM_MIN = 2.0**-100
_FLOAT32_MIN_NORMAL = 2.0**-126


def _named_leaves(tree, what: str) -> list[tuple[str, jax.Array]]:
    """(name, leaf) pairs with leaves in float32 or wider; rejects empty trees and non-float leaves."""
    leaves_with_path, _ = tree_util.tree_flatten_with_path(tree)
    if not leaves_with_path:
        raise ValueError(f"{what} tree has no array leaves")
    named = []
    for path, leaf in leaves_with_path:
        name = key_path_name(path)
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"{what} leaf {name!r} has non-float dtype {leaf.dtype}")
        named.append((name, leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))))
    return named


def _check_threshold(threshold) -> None:
    """Refuses a concrete threshold that is negative or not finite (a traced one is taken as is)."""
    try:
        value = float(threshold)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"dead-gradient threshold must be finite and >= 0, got {threshold!r}")


def _leaf_gradient_stats(g: jax.Array, threshold) -> dict[str, jax.Array]:
    """Σg², max|g|, dead fraction and |mean|/std SNR of one leaf, as plain reductions.

    The variance is two-pass about the leaf's first element: the differences are small where
    |mean| >> std, so nothing cancels, and a constant leaf gets exactly 0 (as in NumPy; centring
    on the rounded float32 mean would leave a residue above SNR_STD_FLOOR there).
    """
    n = g.size
    if n == 0:
        zero = jnp.zeros((), g.dtype)
        return {"sum_sq": zero, "linf": zero, "dead_frac": zero, "snr": zero}
    sum_sq = jnp.sum(g * g)
    # XLA:CPU's max skips NaN where NumPy's propagates it; Σg² is NaN exactly when a value is.
    linf = jnp.where(jnp.isnan(sum_sq), jnp.nan, jnp.max(jnp.abs(g)))
    dead = jnp.sum(jnp.abs(g) < threshold, dtype=jnp.int32)
    first = g.reshape(-1)[0]
    shifted = g - first
    shifted_mean = jnp.sum(shifted) / n
    std = jnp.sqrt(jnp.sum(jnp.square(shifted - shifted_mean)) / n)
    mean = first + shifted_mean
    snr = jnp.where(std > SNR_STD_FLOOR, jnp.abs(mean) / jnp.where(std > 0, std, 1.0), 0.0)
    return {"sum_sq": sum_sq, "linf": linf, "dead_frac": dead.astype(g.dtype) / n, "snr": snr.astype(g.dtype)}


def compute_gradient_stats(grads, threshold: float = 1e-8) -> dict[str, jax.Array]:
    """Per-leaf L2 norm, L∞ norm, dead fraction (|g| < threshold, the threshold
    rounded to the leaf's float type) and |mean|/std SNR (population std; 0 where
    std <= 1e-10), their aggregates over leaves, and the global norm `grad_norm`.
    NaN in a leaf gives NaN norms; the norms are sums in the leaf's float type, so they
    overflow to inf where Σg² leaves its range (as optax's global norm does)."""
    named = _named_leaves(grads, "gradient")
    _check_threshold(threshold)
    metrics = {}
    sum_sq, l2, linf, dead, snr = [], [], [], [], []
    for name, g in named:
        stats = _leaf_gradient_stats(g, threshold)
        norm = jnp.sqrt(stats["sum_sq"])
        metrics[f"grad_norm_l2/{name}"] = norm
        metrics[f"grad_norm_linf/{name}"] = stats["linf"]
        metrics[f"dead_neuron_frac/{name}"] = stats["dead_frac"]
        metrics[f"grad_snr/{name}"] = stats["snr"]
        sum_sq.append(stats["sum_sq"])
        l2.append(norm)
        linf.append(stats["linf"])
        dead.append(stats["dead_frac"])
        snr.append(stats["snr"])
    l2, linf, dead, snr, sum_sq = (jnp.stack(v) for v in (l2, linf, dead, snr, sum_sq))
    metrics["grad_norm_l2/mean"] = jnp.mean(l2)
    metrics["grad_norm_l2/min"] = jnp.min(l2)
    metrics["grad_norm_linf/max"] = jnp.max(linf)
    metrics["dead_neuron_frac/mean"] = jnp.mean(dead)
    metrics["grad_snr/mean"] = jnp.mean(snr)
    metrics["grad_snr/min"] = jnp.min(snr)
    metrics["grad_norm"] = jnp.sqrt(jnp.sum(sum_sq))
    return metrics


def _structure_difference(tree_a, tree_b) -> str:
    paths_a = {key_path_name(p) for p, _ in tree_util.tree_flatten_with_path(tree_a)[0]}
    paths_b = {key_path_name(p) for p, _ in tree_util.tree_flatten_with_path(tree_b)[0]}
    only_a, only_b = sorted(paths_a - paths_b), sorted(paths_b - paths_a)
    if only_a or only_b:
        return f"leaves only in the first: {only_a[:5]}, only in the second: {only_b[:5]}"
    return (f"same leaf names but different containers: "
            f"{tree_util.tree_structure(tree_a)} vs {tree_util.tree_structure(tree_b)}")


def _ratio(numerator, denominator):
    """numerator / denominator, 0 where the denominator is 0 (the convention of every cosine and
    norm ratio here, where the quantity is undefined); NaN stays NaN."""
    return jnp.where(denominator == 0, 0.0, numerator / jnp.where(denominator == 0, 1.0, denominator))


def _leaf_agreement(a, b):
    """(cosine, ‖a‖, ‖b‖) of one pair of leaves, for any float32 magnitude.

    The plain sums serve while Σa² and Σb² are finite and at least _PLAIN_SUM_MIN (subnormal
    products then change them by at most ~n·2**-50 relative). Otherwise, under `lax.cond`, each
    leaf is first divided by max(max|x|, smallest normal), so that no sum overflows or underflows.
    A NaN or inf element gives NaN. XLA:CPU flushes subnormal elements (< 2**-126) to zero.
    """
    def unscaled(_):
        return dot, jnp.sqrt(sum_sq_a), jnp.sqrt(sum_sq_b), one, one

    def rescaled(_):
        scale_a = jnp.maximum(jnp.max(jnp.abs(a), initial=0.0), _FLOAT32_MIN_NORMAL)
        scale_b = jnp.maximum(jnp.max(jnp.abs(b), initial=0.0), _FLOAT32_MIN_NORMAL)
        x, y = a / scale_a, b / scale_b
        return jnp.sum(x * y), jnp.sqrt(jnp.sum(x * x)), jnp.sqrt(jnp.sum(y * y)), scale_a, scale_b

    one = jnp.ones((), a.dtype)
    dot, sum_sq_a, sum_sq_b = jnp.sum(a * b), jnp.sum(a * a), jnp.sum(b * b)
    plain = (jnp.isfinite(sum_sq_a) & jnp.isfinite(sum_sq_b)
             & (sum_sq_a >= _PLAIN_SUM_MIN) & (sum_sq_b >= _PLAIN_SUM_MIN))
    dot, norm_a, norm_b, scale_a, scale_b = lax.cond(plain, unscaled, rescaled, None)
    cos = jnp.clip(_ratio(_ratio(dot, norm_a), norm_b), -1.0, 1.0)
    return cos, scale_a * norm_a, scale_b * norm_b


def _global_norm(norms):
    """sqrt(Σ norms²) without overflow or underflow: the largest norm is factored out."""
    largest = jnp.max(norms)
    return largest * jnp.sqrt(jnp.sum(jnp.square(_ratio(norms, largest))))


def gradient_cosine_similarity(grads_a, grads_b) -> dict[str, jax.Array]:
    """How the gradient `grads_a` (quantized) agrees with `grads_b` (the FP32 shadow).

    - `grad_cos_sim/<leaf>`: cosine of the two leaves; `/mean` and `/min` over leaves (unweighted);
      `/global`: cosine of the whole flattened gradients, Σ<a_leaf, b_leaf> / (‖a‖·‖b‖).
    - `grad_norm_ratio/<leaf>`: ‖a_leaf‖ / ‖b_leaf‖; `/global`: ‖a‖ / ‖b‖ over the whole tree.
    A cosine is 0 where either norm is 0, a ratio is 0 where the shadow norm ‖b‖ is 0 (both are
    then undefined). A NaN or inf element gives NaN. No sum overflows or underflows, so the values
    are accurate at any gradient magnitude whose norm fits in float32 (see _leaf_agreement).
    """
    if tree_util.tree_structure(grads_a) != tree_util.tree_structure(grads_b):
        raise ValueError("gradient trees differ in structure: "
                         + _structure_difference(grads_a, grads_b))
    named_a = _named_leaves(grads_a, "gradient")
    named_b = _named_leaves(grads_b, "gradient")
    metrics = {}
    cosines, norms_a, norms_b = [], [], []
    for (name, a), (_, b) in zip(named_a, named_b):
        if a.shape != b.shape:
            raise ValueError(f"gradient leaf {name!r} has shape {a.shape} vs {b.shape}")
        cos, norm_a, norm_b = _leaf_agreement(a, b)
        metrics[f"grad_cos_sim/{name}"] = cos
        metrics[f"grad_norm_ratio/{name}"] = _ratio(norm_a, norm_b)
        cosines.append(cos)
        norms_a.append(norm_a)
        norms_b.append(norm_b)
    cosines, norms_a, norms_b = (jnp.stack(v) for v in (cosines, norms_a, norms_b))
    metrics["grad_cos_sim/mean"] = jnp.mean(cosines)
    metrics["grad_cos_sim/min"] = jnp.min(cosines)
    # Σ<a_leaf, b_leaf> = Σ cos_leaf·‖a_leaf‖·‖b_leaf‖, so the global cosine is a weighted sum of
    # the leaf cosines with weights ‖a_leaf‖/‖a‖ · ‖b_leaf‖/‖b‖ (each in [0, 1]).
    global_a, global_b = _global_norm(norms_a), _global_norm(norms_b)
    weights = _ratio(norms_a, global_a) * _ratio(norms_b, global_b)
    metrics["grad_cos_sim/global"] = jnp.clip(jnp.sum(cosines * weights), -1.0, 1.0)
    metrics["grad_norm_ratio/global"] = _ratio(global_a, global_b)
    return metrics


def compute_stability_metrics(params) -> dict[str, jax.Array]:
    """Total NaN and ±inf element counts over all float leaves, as int32 scalars."""
    nan_count = jnp.zeros((), jnp.int32)
    inf_count = jnp.zeros((), jnp.int32)
    for leaf in tree_util.tree_leaves(params):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.inexact) or leaf.size == 0:
            continue
        nan_count += jnp.sum(jnp.isnan(leaf), dtype=jnp.int32)
        inf_count += jnp.sum(jnp.isinf(leaf), dtype=jnp.int32)
    return {"param_nan_count": nan_count, "param_inf_count": inf_count}
