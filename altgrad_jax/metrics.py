"""Gradient and parameter health metrics over pytrees.

Every function is pure and jittable, makes no host syncs, and returns a flat dict
of scalar arrays whose names come from the tree key paths (`layer_name`).
Counts (`param_nan_count`, `param_inf_count`) are int32 so they stay exact above
2**24 elements; everything else is float32 (float64 for float64 leaves).

Performance (measured with benchmarks/bench_metrics.py on the 2-core CPU machine):
on XLA:CPU every large reduction runs in YNNPACK as its own pass over the leaf,
each elementwise op inside it costs roughly half a pass, an elementwise result
shared by two reductions is materialised by a slow native loop, and compare/select
has no YNNPACK form at all (a compare-and-count costs 7-16 passes). The CPU
formulation is therefore four independent reductions per leaf: Σg², Σg, max|g|
(behind an optimization barrier so that |g| is not shared) and Σceil(t - |g|),
which equals the dead count exactly (see _fast_dead_count); the variance comes
from Σg² and Σg. Leaves of 4M+ values are reduced in cache-sized row blocks.
Exact but slower recomputations run under `lax.cond` only where the cheap form
could be wrong (max|g| >= 1, non-finite values, |mean| > √3·std, counts >= 2**24).
Other platforms fuse sibling reductions, so they use the plain exact form.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax import tree_util

# An SNR is reported as 0 when the population std is at or below this.
SNR_STD_FLOOR = 1e-10
# Leaves smaller than this stay on XLA's native CPU path, where the plain form is fine.
_FAST_PATH_MIN_SIZE = 4096
# A float32 sum of 0/1 values is exact while it stays below 2**24.
_EXACT_FLOAT_COUNT = 2.0**24
# Leaves of at least four such blocks are reduced block by block (see _block_passes).
_BLOCK_ELEMENTS = 1 << 20
# Trust E[g²] - E[g]² only while var >= E[g²]/4 (|mean|/std <= √3): its rounding
# error is then at most 4x that of the sums; beyond that, centre first.
_NAIVE_VAR_MIN_FRACTION = 0.25
# Plain Σx² at or above this (2**-100) is accurate; below it, or not finite, leaves are rescaled.
_PLAIN_SUM_MIN = 2.0**-100
_FLOAT32_MIN_NORMAL = 2.0**-126


def layer_name(key_path) -> str:
    """Joins a pytree key path with "/": dict keys, sequence indices, attribute names."""
    parts = []
    for key in key_path:
        if isinstance(key, tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def _named_leaves(tree, what: str) -> list[tuple[str, jax.Array]]:
    """(name, leaf) pairs with leaves in float32 or wider; rejects empty trees and non-float leaves."""
    leaves_with_path, _ = tree_util.tree_flatten_with_path(tree)
    if not leaves_with_path:
        raise ValueError(f"{what} tree has no array leaves")
    named = []
    for path, leaf in leaves_with_path:
        name = layer_name(path)
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"{what} leaf {name!r} has non-float dtype {leaf.dtype}")
        named.append((name, leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))))
    return named


def _check_threshold(threshold):
    """Returns the threshold as a Python float when it is concrete, else None (traced)."""
    try:
        value = float(threshold)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"dead-gradient threshold must be finite and >= 0, got {threshold!r}")
    return value


def _exact_dead_count(g, threshold):
    return jnp.sum(jnp.abs(g) < threshold, dtype=jnp.int32)


def _float_count_or_exact(float_count, g, threshold):
    """Casts a float sum of 0/1 values to int32, recounting exactly if it may have rounded."""
    return lax.cond(float_count < _EXACT_FLOAT_COUNT,
                    lambda: float_count.astype(jnp.int32),
                    lambda: _exact_dead_count(g, threshold))


def _block_passes(g, threshold: float):
    """Σg², Σg, max|g| and Σceil(t - |g|) (int32) of a leaf with ndim >= 2, reduced
    block by block (rows, about _BLOCK_ELEMENTS values) so that the four passes over a
    block read it from cache; measured ~5-10% faster than whole-leaf passes at 49M values."""
    rows = g.shape[0]
    block = max(1, _BLOCK_ELEMENTS // (g.size // rows))

    def passes(x):
        return (jnp.sum(x * x), jnp.sum(x), jnp.max(jnp.abs(lax.optimization_barrier(x))),
                jnp.sum(jnp.ceil(threshold - jnp.abs(x))).astype(jnp.int32))

    def combine(a, b):
        return a[0] + b[0], a[1] + b[1], jnp.maximum(a[2], b[2]), a[3] + b[3]

    def body(i, acc):
        return combine(acc, passes(lax.dynamic_slice_in_dim(g, i * block, block)))

    zero = jnp.zeros((), g.dtype)
    acc = lax.fori_loop(0, rows // block, body, (zero, zero, zero, jnp.zeros((), jnp.int32)))
    if rows % block:
        acc = combine(acc, passes(g[rows - rows % block:]))
    return acc


def _fast_dead_count(g, threshold: float, abs_max, sum_sq, ceil_count=None):
    """Count of |g| < threshold (0 <= threshold <= 1) without compare/select.

    ceil(t - |g|) is exactly 1 when |g| < t (then 0 < t - |g| <= t <= 1; the sign of
    a float difference is exact) and lies in (-1, 0] when t <= |g| < 1, so while
    max|g| < 1 its sum is the count (`ceil_count` when the caller summed it already).
    Otherwise max(., 0) clips the negative terms, and non-finite leaves (where
    ceil/max would see NaN) are counted exactly.
    """
    def below_one(x):
        if ceil_count is not None:
            return ceil_count
        return _float_count_or_exact(jnp.sum(jnp.ceil(threshold - jnp.abs(x))), x, threshold)

    def clipped(x):
        count = jnp.sum(jnp.maximum(jnp.ceil(threshold - jnp.abs(x)), 0.0))
        return _float_count_or_exact(count, x, threshold)

    def exact(x):
        return _exact_dead_count(x, threshold)

    branch = jnp.where(jnp.isfinite(sum_sq), jnp.where(abs_max < 1.0, 0, 1), 2)
    return lax.switch(branch, [below_one, clipped, exact], g)


def _variance(g, mean, sum_sq, n, cheap: bool):
    """Population variance; exactly 0 for a constant leaf."""
    def centred(x):
        var = jnp.sum(jnp.square(x - mean)) / n
        # An inexact mean leaves a tiny residue on a constant leaf; NumPy gives 0 there.
        return jnp.where(jnp.max(x) == jnp.min(x), 0.0, var)

    if cheap:
        naive = sum_sq / n - mean * mean
        reliable = naive >= (sum_sq / n) * _NAIVE_VAR_MIN_FRACTION
        var = lax.cond(reliable, lambda x: naive, centred, g)
    else:
        var = centred(g)
    return jnp.maximum(var, 0.0)


def _leaf_gradient_stats(g: jax.Array, threshold, *, fast: bool) -> dict[str, jax.Array]:
    """Σg², max|g|, dead fraction and SNR of one leaf.

    fast=True is the XLA:CPU formulation (see the module docstring); fast=False is
    the plain one, used on other platforms, for small leaves and traced thresholds.
    """
    n = g.size
    if n == 0:
        zero = jnp.zeros((), g.dtype)
        return {"sum_sq": zero, "linf": zero, "dead_frac": zero, "snr": zero}
    threshold_value = _check_threshold(threshold)
    fast = fast and n >= _FAST_PATH_MIN_SIZE and threshold_value is not None and threshold_value <= 1.0
    if fast and g.ndim >= 2 and n >= 4 * _BLOCK_ELEMENTS and n // g.shape[0] <= _BLOCK_ELEMENTS:
        sum_sq, total, abs_max, ceil_count = _block_passes(g, threshold_value)
        mean = total / n
        dead = _fast_dead_count(g, threshold_value, abs_max, sum_sq, ceil_count)
    elif fast:
        sum_sq = jnp.sum(g * g)
        mean = jnp.sum(g) / n
        # The barrier gives the max its own |g|: XLA would otherwise share |g| with the
        # count and materialise it in a slow native loop instead of two fused passes.
        abs_max = jnp.max(jnp.abs(lax.optimization_barrier(g)))
        dead = _fast_dead_count(g, threshold_value, abs_max, sum_sq)
    else:
        sum_sq = jnp.sum(g * g)
        mean = jnp.sum(g) / n
        abs_max = jnp.max(jnp.abs(g))
        dead = _exact_dead_count(g, threshold)
    # YNNPACK's max skips NaN where XLA's propagates it; Σg² tells which applies.
    abs_max = jnp.where(jnp.isnan(sum_sq), jnp.nan, abs_max)
    std = jnp.sqrt(_variance(g, mean, sum_sq, n, cheap=fast))
    snr = jnp.where(std > SNR_STD_FLOOR, jnp.abs(mean) / jnp.where(std > 0, std, 1.0), 0.0)
    return {
        "sum_sq": sum_sq,
        "linf": abs_max,
        "dead_frac": dead.astype(g.dtype) / n,
        "snr": snr.astype(g.dtype),
    }


def _platform_leaf_stats(g, threshold):
    """Picks the CPU or the plain formulation when the computation is lowered."""
    keys = ("sum_sq", "linf", "dead_frac", "snr")

    def run(fast):
        def stats(x):
            result = _leaf_gradient_stats(x, threshold, fast=fast)
            return tuple(result[k] for k in keys)
        return stats

    return dict(zip(keys, lax.platform_dependent(g, cpu=run(True), default=run(False))))


def compute_gradient_stats(grads, threshold: float = 1e-8) -> dict[str, jax.Array]:
    """Per-leaf L2 norm, L∞ norm, dead fraction (|g| < threshold, the threshold
    rounded to the leaf's float type) and |mean|/std SNR (population std; 0 where
    std <= 1e-10), their aggregates over leaves, and the global norm `grad_norm`."""
    named = _named_leaves(grads, "gradient")
    metrics = {}
    sum_sq, l2, linf, dead, snr = [], [], [], [], []
    for name, g in named:
        stats = _platform_leaf_stats(g, threshold)
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
    paths_a = {layer_name(p) for p, _ in tree_util.tree_flatten_with_path(tree_a)[0]}
    paths_b = {layer_name(p) for p, _ in tree_util.tree_flatten_with_path(tree_b)[0]}
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


def _leaf_nonfinite_counts(leaf):
    """(NaN count, ±inf count) as int32. One plain sum decides whether to count at all:
    compare-and-count is slow on XLA:CPU, and a finite sum means no NaN/inf (a sum that
    overflows only sends a finite leaf to the exact count)."""
    def count(x):
        return jnp.sum(jnp.isnan(x), dtype=jnp.int32), jnp.sum(jnp.isinf(x), dtype=jnp.int32)

    def none(x):
        return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)

    return lax.cond(jnp.isfinite(jnp.sum(leaf)), none, count, leaf)


def compute_stability_metrics(params) -> dict[str, jax.Array]:
    """Total NaN and ±inf element counts over all float leaves, as int32 scalars."""
    nan_count = jnp.zeros((), jnp.int32)
    inf_count = jnp.zeros((), jnp.int32)
    for leaf in tree_util.tree_leaves(params):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.inexact) or leaf.size == 0:
            continue
        leaf_nan, leaf_inf = _leaf_nonfinite_counts(leaf)
        nan_count += leaf_nan
        inf_count += leaf_inf
    return {"param_nan_count": nan_count, "param_inf_count": inf_count}
