"""Quantization metrics from the statistics every quantized matmul reports (rows x, w, dy).

Per layer and role (x: input activation, w: kernel, dy: gradient arriving at the output):
- quant/overflow/<role>/<layer>: saturated elements / all elements of that tensor;
- quant/underflow/<role>/<layer>: non-zero elements that became 0 / non-zero elements;
- quant/rel_err/<role>/<layer>: ||q(t) - t|| / ||t|| (0 for an all-zero tensor).
Pooled over layers: overflow_rate/<role>, underflow_rate/<role> (the same ratios of summed
counts), and overflow_rate, underflow_rate over every quantized tensor of every role.
Only quantized slots report; a role no layer quantizes has no pooled metric.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from altgrad_jax.quant.counts import STATS
from altgrad_jax.quant.rounding import reciprocal, round_to_format
from altgrad_jax.quant.scaling import SLOTS

_OVERFLOW, _UNDERFLOW, _NONZERO, _ELEMENTS, _ERR_SQ, _NORM_SQ = (
    STATS.index(name) for name in ("overflow", "underflow", "nonzero", "elements", "err_sq", "norm_sq"))


def _ratio(numerator, denominator):
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def quantization_metrics(layers, stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`layers`: the plan's PlannedLayers; `stats`: {layer name: float32[3, 1 + C, N_STATS]}
    (column 0: the slot's own statistics; the what-if candidates' follow, see whatif_metrics)."""
    metrics, pooled = {}, {}
    for layer in layers:
        for row, (role, slot) in enumerate(zip(SLOTS, layer.recipe.slots())):
            if slot.format is None:
                continue
            vector = stats[layer.name][row, 0]
            metrics[f"quant/overflow/{role}/{layer.name}"] = _ratio(vector[_OVERFLOW], vector[_ELEMENTS])
            metrics[f"quant/underflow/{role}/{layer.name}"] = _ratio(vector[_UNDERFLOW], vector[_NONZERO])
            metrics[f"quant/rel_err/{role}/{layer.name}"] = jnp.sqrt(_ratio(vector[_ERR_SQ], vector[_NORM_SQ]))
            pooled[role] = vector if role not in pooled else pooled[role] + vector
    for role, vector in pooled.items():
        metrics[f"overflow_rate/{role}"] = _ratio(vector[_OVERFLOW], vector[_ELEMENTS])
        metrics[f"underflow_rate/{role}"] = _ratio(vector[_UNDERFLOW], vector[_NONZERO])
    if pooled:
        total = sum(pooled.values())
        metrics["overflow_rate"] = _ratio(total[_OVERFLOW], total[_ELEMENTS])
        metrics["underflow_rate"] = _ratio(total[_UNDERFLOW], total[_NONZERO])
    return metrics


def whatif_metrics(layers, stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """whatif/<candidate>/<role>/{underflow,overflow,rel_err}/<layer>: the quant/* definitions
    above for the same tensor rounded to each what-if candidate (whatif.py)."""
    metrics = {}
    for layer in layers:
        for row, (role, slot) in enumerate(zip(SLOTS, layer.recipe.slots())):
            if slot.format is None:
                continue
            for column, candidate in enumerate(layer.recipe.whatif, start=1):
                vector = stats[layer.name][row, column]
                prefix = f"whatif/{candidate}/{role}"
                metrics[f"{prefix}/underflow/{layer.name}"] = _ratio(vector[_UNDERFLOW], vector[_NONZERO])
                metrics[f"{prefix}/overflow/{layer.name}"] = _ratio(vector[_OVERFLOW], vector[_ELEMENTS])
                metrics[f"{prefix}/rel_err/{layer.name}"] = jnp.sqrt(_ratio(vector[_ERR_SQ], vector[_NORM_SQ]))
    return metrics


def bit_stall_metrics(plan, quant_state, old_params, new_params, grads) -> dict[str, jax.Array]:
    """quant/bit_stall/<layer>: among kernel elements with a non-zero gradient, the fraction whose
    weight-slot value (round to nearest at this step's w scale) is the same before and after the
    optimizer update; bit_stall_rate: the same pooled over every layer with a quantized w."""
    metrics, stalled_total, moving_total = {}, jnp.float32(0), jnp.float32(0)
    for layer in plan.layers:
        if layer.recipe.w.format is None:
            continue
        old_kernel, new_kernel = (_get(tree, layer.path)["kernel"] for tree in (old_params, new_params))
        scale = plan.weight_scale(layer, quant_state, old_kernel)
        old_grid, new_grid = (round_to_format(k * reciprocal(scale), layer.recipe.w.format) for k in (old_kernel, new_kernel))
        has_grad = _get(grads, layer.path)["kernel"] != 0
        stalled = jnp.sum(has_grad & (old_grid == new_grid), dtype=jnp.float32)
        moving = jnp.sum(has_grad, dtype=jnp.float32)
        metrics[f"quant/bit_stall/{layer.name}"] = _ratio(stalled, moving)
        stalled_total, moving_total = stalled_total + stalled, moving_total + moving
    if metrics:
        metrics["bit_stall_rate"] = _ratio(stalled_total, moving_total)
    return metrics


def _get(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree
