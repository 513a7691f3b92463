"""One quantized matmul with the field's three operand slots (TransformerEngine; Micikevicius et
al. 2022): x and w in the forward product, dy (the gradient arriving at the output) in both
backward products.

    y  = q(x; x) @ q(w; w)
    dx = q(dy; dy) @ q(w; w)^T        dw = q(x; x)^T @ q(dy; dy)    (float32 accumulation)

with q(t; slot) = s * round(t / s) for the slot's format, scale s and rounding; a slot whose
format is None keeps its operand in float32. x may have leading batch dimensions (dw sums over
them), w is [in, out]. dw goes to the float32 master weight: straight-through on the rounding.

`layer_matmul` is the form the model uses: given a zero `probe` of shape [3, 1 + C, N_STATS],
the gradient with respect to the probe is the `tensor_stats` of the three quantizations (rows
x, w, dy), followed by those of the C what-if candidates (whatif.py), so one `jax.grad` returns
gradients and quantization statistics together, including dy's, which exists only in the
backward pass. With `recipe.hardware` the products run on float8
operands (hardware.py) with the scales applied to the float32 result.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from altgrad_jax.quant.counts import N_STATS, tensor_stats
from altgrad_jax.quant.hardware import hardware_dtype
from altgrad_jax.quant.recipe import LayerRecipe, SlotRecipe
from altgrad_jax.quant.rounding import STOCHASTIC, reciprocal, round_to_format
from altgrad_jax.quant.scaling import DELAYED, resolve_scale
from altgrad_jax.quant.whatif import maybe_whatif_stats

_ROWS, _COLUMNS = ((1,), (0,)), ((0,), (0,))  # contract a's dim 1 with b's 0 / a's 0 with b's 0
_TRANSPOSED_B = ((1,), (1,))


def _dot(a, b, contracting=_ROWS):
    return lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)


class _Operand(NamedTuple):
    """One operand after quantization: its grid values (t / scale rounded), scale and GEMM input."""

    grid: jax.Array
    scale: jax.Array
    gemm_input: jax.Array  # float32 scale * grid, or float8 grid on the hardware path


def _quantize_operand(tensor, slot: SlotRecipe, given_scale, margin: float, key, hardware: bool) -> _Operand:
    if slot.format is None:
        return _Operand(tensor, jnp.float32(1.0), tensor)
    scale = resolve_scale(slot.scaling, given_scale, tensor, slot.format, margin)
    grid = round_to_format(tensor * reciprocal(scale), slot.format, slot.rounding,
                           key if slot.rounding == STOCHASTIC else None)
    # float8 operands are exact casts of the grid values; the scales multiply the product.
    return _Operand(grid, scale, grid.astype(hardware_dtype(slot.format)) if hardware else grid * scale)


def _stats(tensor, operand: _Operand, slot: SlotRecipe, recipe: LayerRecipe, whatif, row: int) -> jax.Array:
    """[1 + len(recipe.whatif), N_STATS]: this slot's statistics, then each what-if candidate's."""
    if slot.format is None:
        return jnp.zeros((1 + len(recipe.whatif), N_STATS), jnp.float32)
    own = tensor_stats(tensor, operand.grid * operand.scale, slot.format, operand.scale, slot.rounding == STOCHASTIC)
    if not recipe.whatif:
        return own[None]
    active, history_amax = whatif
    candidates = maybe_whatif_stats(active, tensor, recipe.whatif, slot.scaling, history_amax[row], recipe.margin)
    return jnp.concatenate([own[None], candidates])


def _slot_key(key_data, index: int):
    return None if key_data is None else jax.random.fold_in(jax.random.wrap_key_data(key_data), index)


def _forward(recipe: LayerRecipe, x, w, scales, key_data, whatif, with_stats: bool):
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"quantized_matmul needs x [..., K] and w [K, N], got {x.shape} and {w.shape}")
    x2 = x.reshape(-1, x.shape[-1])
    x_op = _quantize_operand(x2, recipe.x, scales[0], recipe.margin, _slot_key(key_data, 0), recipe.hardware)
    w_op = _quantize_operand(w, recipe.w, scales[1], recipe.margin, _slot_key(key_data, 1), recipe.hardware)
    y = _dot(x_op.gemm_input, w_op.gemm_input)
    if recipe.hardware:
        y = y * (x_op.scale * w_op.scale)
    stats = None
    if with_stats:
        stats = (_stats(x2, x_op, recipe.x, recipe, whatif, 0), _stats(w, w_op, recipe.w, recipe, whatif, 1))
    residuals = (x_op.gemm_input, x_op.scale, w_op.gemm_input, w_op.scale, scales[2], key_data, whatif, stats, x.shape)
    return y.reshape(*x.shape[:-1], w.shape[1]), residuals


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul(recipe: LayerRecipe, x, w, scales, probe, key_data, whatif):
    del probe
    return _forward(recipe, x, w, scales, key_data, whatif, with_stats=False)[0]


def _matmul_fwd(recipe, x, w, scales, probe, key_data, whatif):
    return _forward(recipe, x, w, scales, key_data, whatif, with_stats=probe is not None)


def _matmul_bwd(recipe: LayerRecipe, residuals, dy):
    x_input, x_scale, w_input, w_scale, dy_given_scale, key_data, whatif, stats, x_shape = residuals
    dy2 = dy.reshape(-1, dy.shape[-1]).astype(jnp.float32)
    dy_op = _quantize_operand(dy2, recipe.dy, dy_given_scale, recipe.margin, _slot_key(key_data, 2), recipe.hardware)
    dx = _dot(dy_op.gemm_input, w_input, _TRANSPOSED_B)
    dw = _dot(x_input, dy_op.gemm_input, _COLUMNS)
    if recipe.hardware:
        dx, dw = dx * (dy_op.scale * w_scale), dw * (x_scale * dy_op.scale)
    probe_cotangent = None if stats is None else jnp.stack([*stats, _stats(dy2, dy_op, recipe.dy, recipe, whatif, 2)])
    key_cotangent = None if key_data is None else np.zeros(key_data.shape, jax.dtypes.float0)
    whatif_cotangent = None if whatif is None else (np.zeros((), jax.dtypes.float0), jnp.zeros((3,), jnp.float32))
    return dx.reshape(x_shape), dw, jnp.zeros((3,), jnp.float32), probe_cotangent, key_cotangent, whatif_cotangent


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def layer_matmul(x, w, recipe: LayerRecipe, scales, probe=None, key=None, whatif=None) -> jax.Array:
    """x @ w under `recipe`; `scales` float32[3] are the given (delayed) scales of x, w, dy (a
    value that is not positive and finite means "not known yet": current scaling is used);
    `probe` zeros([3, 1 + len(recipe.whatif), N_STATS]) to read the statistics as its gradient
    (rows x, w, dy; then the slot's own statistics and each what-if candidate's); `key` a
    jax.random key, needed when a slot rounds stochastically (slots fold in 0, 1, 2); `whatif`
    (active: bool[], history amax float32[3]) when recipe.whatif names candidates (whatif.py)."""
    scales = jnp.asarray(scales, jnp.float32).reshape(3)
    key_data = None if key is None else jax.random.key_data(key)
    if recipe.whatif and whatif is None:
        whatif = (jnp.asarray(False), jnp.zeros((3,), jnp.float32))
    return _matmul(recipe, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), scales, probe, key_data, whatif)


def quantized_matmul(x, w, x_format=None, w_format=None, dy_format=None,
                     x_scale=1.0, w_scale=1.0, dy_scale=1.0) -> jax.Array:
    """q(x) @ q(w) with dy quantized in both backward products; nearest rounding, fixed scales.

    Formats are FORMATS names or None (operand kept in float32); scales are scalars (Python or
    0-d arrays), used as given: scale 1 is the raw range of the format.
    """
    recipe = LayerRecipe(SlotRecipe(x_format, DELAYED), SlotRecipe(w_format, DELAYED), SlotRecipe(dy_format, DELAYED))
    scales = jnp.stack([jnp.asarray(s, jnp.float32).reshape(()) for s in (x_scale, w_scale, dy_scale)])
    return layer_matmul(x, w, recipe, scales)
