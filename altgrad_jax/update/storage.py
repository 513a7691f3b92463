"""What a tensor is stored as: float32, bfloat16, or an 8-bit format at a per-tensor scale.

`Storage` names the grid; `store(values, storage, rounding, random_bits)` rounds float32 values
onto it and returns the array a parameter holds:
- "float32": the values themselves (the float32 sum already rounded to nearest; `rounding` unused);
- "bfloat16": a jnp.bfloat16 array (nearest: the dtype cast, ties to even; stochastic: see
  stochastic.py), saturating at the bfloat16 maximum;
- a FORMATS name: float32 values on `scale * grid`. The model computes in float32, so the values
  stay in a float32 container; they are the only copy (no master weight); `moments.py` holds the
  8-bit codes themselves where memory matters.
The per-tensor scale is always a power of two: `pow2_scale(amax, fmt)`, the smallest 2**k with
amax <= 2**k * max_finite (1 when amax is 0 or not finite). A power of two keeps the scaling
exact and, unlike amax * margin / max_finite, never lets round-to-nearest push the largest
weight up a code every step (PITFALLS.md). A stored weight's scale is not kept anywhere: each
store derives it from the values being stored, and `tensor_scale(stored)` from the stored values,
so the state holds nothing but the parameters. After a store the two may differ by one factor
of 2 (the largest value rounded down to exactly half the range); the finer grid then still holds
every stored value.

`ulp(stored, storage, scale)` is the local grid spacing: 2**(floor(log2|w/scale|) - M) * scale
for |w/scale| >= min_normal, min_subnormal * scale below (zero included): the gap up to the next
larger magnitude. For float32/bfloat16 it is 2**(floor(log2|w|) - M) and underflows to 0 for
|w| < 2**(M - 126) (XLA:CPU flushes float32 subnormals), so zero weights have a ULP of 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from altgrad_jax.update._quant import FloatFormat, get_format, round_to_format
from altgrad_jax.update.stochastic import BFLOAT16, BFLOAT16_MAX, leaf_random_bits, stochastic_round

FLOAT32 = "float32"
NEAREST = "nearest"
STOCHASTIC = "stochastic"
ROUNDINGS = (NEAREST, STOCHASTIC)


@dataclass(frozen=True)
class Storage:
    """A storage grid by name: "float32", "bfloat16" or a FORMATS name (upper case)."""

    name: str

    @property
    def format(self) -> FloatFormat | None:
        """The 8-bit format, None for float32 and bfloat16."""
        return None if self.name in (FLOAT32, BFLOAT16) else get_format(self.name)

    @property
    def mantissa_bits(self) -> int:
        return {FLOAT32: 23, BFLOAT16: 7}.get(self.name) or self.format.mantissa_bits

    @property
    def dtype(self):
        """The dtype of a stored parameter."""
        return jnp.bfloat16 if self.name == BFLOAT16 else jnp.float32


def get_storage(spec: "str | Storage") -> Storage:
    """Storage from a Storage or a name: float32/fp32, bfloat16/bf16, or a FORMATS name (any case)."""
    if isinstance(spec, Storage):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"storage must be a name or a Storage, got {spec!r}")
    name = {"fp32": FLOAT32, "float32": FLOAT32, "bf16": BFLOAT16, "bfloat16": BFLOAT16}.get(spec.strip().lower())
    return Storage(name if name is not None else get_format(spec).name)


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def exp2_int(exponent: jax.Array) -> jax.Array:
    """Exactly 2.0**exponent as float32 for integer exponents in [-126, 127] (from the bits)."""
    biased = (jnp.asarray(exponent, jnp.int32) + 127).astype(jnp.uint32)
    return lax.bitcast_convert_type(biased << np.uint32(23), jnp.float32)


def pow2_scale(amax: jax.Array, fmt: FloatFormat) -> jax.Array:
    """The smallest power of two s (2**-126..2**127) with amax <= s * max_finite; 1 for amax 0/inf/NaN."""
    amax = jnp.asarray(amax, jnp.float32)
    _, amax_exponent = jnp.frexp(amax)
    _, max_exponent = np.frexp(fmt.max_finite)
    # amax / max_finite lies in (2**(k-1), 2**(k+1)) for this k, so k or k + 1 is the answer.
    exponent = jnp.clip(amax_exponent - int(max_exponent), -126, 126)
    exponent = jnp.where(amax > np.float32(fmt.max_finite) * exp2_int(exponent), exponent + 1, exponent)
    usable = (amax > 0) & jnp.isfinite(amax)
    return jnp.where(usable, exp2_int(exponent), np.float32(1.0))


def tensor_scale(values, storage: "str | Storage") -> jax.Array:
    """The per-tensor scale a store of `values` uses: pow2_scale(max|values|); 1 without a format."""
    fmt = get_storage(storage).format
    if fmt is None:
        return jnp.ones((), jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    return pow2_scale(jnp.max(jnp.abs(values)) if values.size else jnp.zeros(()), fmt)


def store(values, storage: "str | Storage", rounding: str = NEAREST, random_bits=None, scale=None) -> jax.Array:
    """`values` rounded onto the storage grid, as the array a parameter holds (dtype storage.dtype).

    `scale` defaults to tensor_scale(values); stochastic rounding needs uint32 `random_bits`
    shaped like values.
    """
    storage = get_storage(storage)
    values = jnp.asarray(values, jnp.float32)
    if check_rounding(rounding) == STOCHASTIC and random_bits is None:
        raise ValueError("stochastic rounding needs random_bits")
    if storage.name == FLOAT32:
        return values
    if storage.name == BFLOAT16:
        if rounding == NEAREST:
            values = jnp.clip(values, -BFLOAT16_MAX, BFLOAT16_MAX)  # the cast itself would overflow to inf
            return values.astype(jnp.bfloat16)
        return stochastic_round(values, BFLOAT16, 1.0, random_bits).astype(jnp.bfloat16)
    scale = tensor_scale(values, storage) if scale is None else jnp.asarray(scale, jnp.float32)
    if rounding == NEAREST:
        return round_to_format(values * (np.float32(1.0) / scale), storage.format) * scale
    return stochastic_round(values, storage.format, scale, random_bits)


def ulp(stored, storage: "str | Storage", scale=None) -> jax.Array:
    """float32 local grid spacing of each stored value (see the module note); scale defaults to
    tensor_scale(stored)."""
    storage = get_storage(storage)
    stored = jnp.asarray(stored, jnp.float32)
    fmt = storage.format
    if fmt is None:
        scale = np.float32(1.0)
        magnitude = jnp.abs(stored)
        min_normal, min_spacing = np.float32(2.0**-126), np.float32(0.0)
    else:
        scale = tensor_scale(stored, storage) if scale is None else jnp.asarray(scale, jnp.float32)
        magnitude = jnp.abs(stored * (np.float32(1.0) / scale))
        min_normal, min_spacing = np.float32(fmt.min_normal), np.float32(fmt.min_subnormal)
    biased_exponent = (lax.bitcast_convert_type(magnitude, jnp.uint32) >> np.uint32(23)).astype(jnp.int32)
    spacing_exponent = jnp.clip(biased_exponent - 127 - storage.mantissa_bits, -126, 127)
    normal = jnp.where(biased_exponent - storage.mantissa_bits >= 1, exp2_int(spacing_exponent), np.float32(0.0))
    return jnp.where(magnitude >= min_normal, normal, min_spacing) * scale


def store_tree(params, storage, rounding: str = NEAREST, key=None, step=0):
    """Every leaf of `params` stored on its grid; `storage` is one spec or a tree prefix of specs.

    For the initial parameters (nearest by default); stochastic draws bits as stored_weight_update
    does, from (key, step, leaf path).
    """
    bits = leaf_random_bits(key, step, params) if check_rounding(rounding) == STOCHASTIC else None
    leaves, treedef = jax.tree_util.tree_flatten(params)
    storages = storage_leaves(storage, params)
    bit_leaves = [None] * len(leaves) if bits is None else jax.tree_util.tree_leaves(bits)
    stored = [store(p, s, rounding, b) for p, s, b in zip(leaves, storages, bit_leaves)]
    return jax.tree_util.tree_unflatten(treedef, stored)


def storage_leaves(storage, params) -> list[Storage]:
    """One Storage per leaf of `params` (flatten order) from a spec or a tree prefix of specs."""
    expanded = jax.tree_util.tree_map(
        lambda spec, subtree: jax.tree_util.tree_map(lambda _: get_storage(spec), subtree), storage, params
    )
    return jax.tree_util.tree_leaves(expanded, is_leaf=lambda x: isinstance(x, Storage))
