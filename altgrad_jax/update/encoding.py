"""Tensors kept in their storage dtype: `encode(values, storage) -> Encoded(data, scale)` and `decode`.

Used for optimizer moments, where the bytes matter. `data` by storage:
- float32: float32 values; bfloat16: jnp.bfloat16 (nearest cast); `scale` is 1.0;
- E5M2, E4M3, E3M4: the ml_dtypes array (float8_e5m2, float8_e4m3fn, float8_e3m4) of
  q(values / scale), with a float32 per-tensor scale from `tensor_scale` (a power of two);
- the formats without an ml_dtypes dtype (E0M7, E1M6, E2M5, E6M1, E7M0): uint8 codes of the bit
  layout in formats.py (sign bit 7, then the exponent field, then the mantissa field), with the
  same float32 scale. `decode_codes(encode_codes(v)) == v` for every grid value, -0 included.
Rounding is to nearest (ties to even), saturating. decode gives float32 `scale * value`, exact.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from altgrad_jax.update._quant import FloatFormat, round_to_format
from altgrad_jax.update.storage import Storage, exp2_int, get_storage, store, tensor_scale


class Encoded(NamedTuple):
    """A tensor in its storage dtype with a float32 per-tensor scale (1.0 without a format)."""

    data: jax.Array
    scale: jax.Array


def encode_codes(grid_values: jax.Array, fmt: FloatFormat) -> jax.Array:
    """uint8 codes of float32 values that lie on fmt's grid (unscaled)."""
    bits = lax.bitcast_convert_type(grid_values, jnp.uint32)
    sign = (bits >> np.uint32(24)) & np.uint32(0x80)
    magnitude = jnp.abs(grid_values)
    subnormal = jnp.round(magnitude * np.float32(1.0 / fmt.min_subnormal)).astype(jnp.uint32)
    exponent_field = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(jnp.int32) - 127 + fmt.bias
    mantissa = (bits >> np.uint32(23 - fmt.mantissa_bits)) & np.uint32((1 << fmt.mantissa_bits) - 1)
    normal = (jnp.maximum(exponent_field, 0).astype(jnp.uint32) << np.uint32(fmt.mantissa_bits)) | mantissa
    if fmt.min_normal <= fmt.max_finite:
        subnormal = jnp.where(magnitude >= np.float32(fmt.min_normal), normal, subnormal)
    return (subnormal | sign).astype(jnp.uint8)


def decode_codes(codes: jax.Array, fmt: FloatFormat) -> jax.Array:
    """float32 grid values of uint8 codes (the inverse of encode_codes)."""
    codes = codes.astype(jnp.uint32)
    field_mask = np.uint32((1 << (fmt.exponent_bits + fmt.mantissa_bits)) - 1) if fmt.exponent_bits else np.uint32(0x7F)
    magnitude_code = codes & field_mask
    exponent_field = (magnitude_code >> np.uint32(fmt.mantissa_bits)).astype(jnp.int32)
    mantissa = (magnitude_code & np.uint32((1 << fmt.mantissa_bits) - 1)).astype(jnp.float32)
    significand = np.float32(1.0) + mantissa * np.float32(2.0**-fmt.mantissa_bits)
    normal = significand * exp2_int(jnp.clip(exponent_field - fmt.bias, -126, 127))
    subnormal = mantissa * np.float32(fmt.min_subnormal)
    magnitude = jnp.where(exponent_field >= 1, normal, subnormal)
    sign = (codes & np.uint32(0x80)) << np.uint32(24)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(magnitude, jnp.uint32) | sign, jnp.float32)


def encode(values, storage: "str | Storage") -> Encoded:
    """`values` rounded to nearest on the storage grid, in the storage dtype (see the module note)."""
    storage = get_storage(storage)
    values = jnp.asarray(values, jnp.float32)
    fmt = storage.format
    if fmt is None:
        return Encoded(store(values, storage), jnp.ones((), jnp.float32))
    scale = tensor_scale(values, storage)
    grid_values = round_to_format(values * (np.float32(1.0) / scale), fmt)
    data = grid_values.astype(fmt.dtype) if fmt.dtype is not None else encode_codes(grid_values, fmt)
    return Encoded(data, scale)


def decode(encoded: Encoded, storage: "str | Storage") -> jax.Array:
    """float32 `scale * value` of an Encoded tensor."""
    fmt = get_storage(storage).format
    if fmt is None:
        return encoded.data.astype(jnp.float32)
    if fmt.dtype is not None:
        return encoded.data.astype(jnp.float32) * encoded.scale
    return decode_codes(encoded.data, fmt) * encoded.scale
