"""Gradient and parameter health metrics over pytrees.

Every function is pure and jittable, makes no host syncs, and returns a flat dict
of scalar arrays whose names come from the tree key paths (`layer_name`).
Counts (`param_nan_count`, `param_inf_count`) are int32 so they stay exact above
2**24 elements; everything else is float32.
"""

import jax
import jax.numpy as jnp
from jax import tree_util

# An SNR is reported as 0 when the population std is at or below this.
SNR_STD_FLOOR = 1e-10


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
    """(name, float32 leaf) pairs; rejects empty trees and non-float leaves."""
    leaves_with_path, _ = tree_util.tree_flatten_with_path(tree)
    if not leaves_with_path:
        raise ValueError(f"{what} tree has no array leaves")
    named = []
    for path, leaf in leaves_with_path:
        name = layer_name(path)
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"{what} leaf {name!r} has non-float dtype {leaf.dtype}")
        named.append((name, leaf.astype(jnp.float32)))
    return named


def _leaf_gradient_stats(g: jax.Array, threshold) -> dict[str, jax.Array]:
    """Σg², max|g|, dead count and SNR of one leaf."""
    flat = g.reshape(-1)
    n = flat.size
    if n == 0:
        zero = jnp.zeros((), jnp.float32)
        return {"sum_sq": zero, "linf": zero, "dead_frac": zero, "snr": zero}
    abs_g = jnp.abs(flat)
    # Variance from sums shifted by one element of the leaf: a constant leaf gives
    # exactly 0, and E[d²] - E[d]² loses little when |mean| >> std.
    shift = flat[0]
    d = flat - shift
    sum_d = jnp.sum(d)
    sum_d_sq = jnp.sum(d * d)
    mean_d = sum_d / n
    var = jnp.maximum(sum_d_sq / n - mean_d * mean_d, 0.0)
    std = jnp.sqrt(var)
    mean = shift + mean_d
    snr = jnp.where(std > SNR_STD_FLOOR, jnp.abs(mean) / jnp.where(std > 0, std, 1.0), 0.0)
    dead = jnp.sum(abs_g < threshold, dtype=jnp.int32)
    return {
        "sum_sq": jnp.sum(flat * flat),
        "linf": jnp.max(abs_g),
        "dead_frac": dead.astype(jnp.float32) / n,
        "snr": snr,
    }


def compute_gradient_stats(grads, threshold: float = 1e-8) -> dict[str, jax.Array]:
    """Per-leaf L2 norm, L∞ norm, dead fraction (|g| < threshold) and |mean|/std SNR,
    their aggregates over leaves, and the global norm `grad_norm`."""
    named = _named_leaves(grads, "gradient")
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
    l2, linf, dead, snr = (jnp.stack(v) for v in (l2, linf, dead, snr))
    metrics["grad_norm_l2/mean"] = jnp.mean(l2)
    metrics["grad_norm_l2/min"] = jnp.min(l2)
    metrics["grad_norm_linf/max"] = jnp.max(linf)
    metrics["dead_neuron_frac/mean"] = jnp.mean(dead)
    metrics["grad_snr/mean"] = jnp.mean(snr)
    metrics["grad_snr/min"] = jnp.min(snr)
    metrics["grad_norm"] = jnp.sqrt(jnp.sum(jnp.stack(sum_sq)))
    return metrics


def _structure_difference(tree_a, tree_b) -> str:
    paths_a = {layer_name(p) for p, _ in tree_util.tree_flatten_with_path(tree_a)[0]}
    paths_b = {layer_name(p) for p, _ in tree_util.tree_flatten_with_path(tree_b)[0]}
    only_a, only_b = sorted(paths_a - paths_b), sorted(paths_b - paths_a)
    if only_a or only_b:
        return f"leaves only in the first: {only_a[:5]}, only in the second: {only_b[:5]}"
    return (f"same leaf names but different containers: "
            f"{tree_util.tree_structure(tree_a)} vs {tree_util.tree_structure(tree_b)}")


def gradient_cosine_similarity(grads_a, grads_b) -> dict[str, jax.Array]:
    """Per-leaf cosine similarity (0 where either leaf has zero norm), mean and min."""
    if tree_util.tree_structure(grads_a) != tree_util.tree_structure(grads_b):
        raise ValueError("gradient trees differ in structure: "
                         + _structure_difference(grads_a, grads_b))
    named_a = _named_leaves(grads_a, "gradient")
    named_b = _named_leaves(grads_b, "gradient")
    metrics = {}
    cosines = []
    for (name, a), (_, b) in zip(named_a, named_b):
        if a.shape != b.shape:
            raise ValueError(f"gradient leaf {name!r} has shape {a.shape} vs {b.shape}")
        a, b = a.reshape(-1), b.reshape(-1)
        dot = jnp.sum(a * b)
        norms = jnp.sqrt(jnp.sum(a * a)) * jnp.sqrt(jnp.sum(b * b))
        cos = jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0)
        cos = jnp.clip(cos, -1.0, 1.0)
        metrics[f"grad_cos_sim/{name}"] = cos
        cosines.append(cos)
    cosines = jnp.stack(cosines)
    metrics["grad_cos_sim/mean"] = jnp.mean(cosines)
    metrics["grad_cos_sim/min"] = jnp.min(cosines)
    return metrics


def compute_stability_metrics(params) -> dict[str, jax.Array]:
    """Total NaN and ±inf element counts over all float leaves, as int32 scalars."""
    nan_count = jnp.zeros((), jnp.int32)
    inf_count = jnp.zeros((), jnp.int32)
    for leaf in tree_util.tree_leaves(params):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        nan_count += jnp.sum(jnp.isnan(leaf), dtype=jnp.int32)
        inf_count += jnp.sum(jnp.isinf(leaf), dtype=jnp.int32)
    return {"param_nan_count": nan_count, "param_inf_count": inf_count}
