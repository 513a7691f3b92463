"""The 8-bit float formats of the study, described by their bit layout.

Every format is sign + `exponent_bits` + `mantissa_bits` = 8 bits, with subnormals. Values of a
format with exponent field e and mantissa field m (m < 2**M) are

    e == 0:  m * 2**(1 - bias - M)                  (zero and subnormals)
    e >= 1:  (1 + m / 2**M) * 2**(e - bias)         (normals)

E5M2, E4M3 and E3M4 are ml_dtypes' `float8_e5m2` (IEEE-like: inf and NaN in the top exponent),
`float8_e4m3fn` (OCP E4M3: no inf, only S.1111.111 is NaN, max 448) and `float8_e3m4` (IEEE-like).
The others have no ml_dtypes type: their bias is 2**(E-1) - 1 and every code is a finite number.
E0M7 has no exponent field and is sign-magnitude fixed point with step 1/128: its bias is taken
as 1 so that the subnormal formula above gives m / 128. It has no normal numbers, so its
`min_normal` (1.0 = 2**(1 - bias), where normals would begin) lies above its `max_finite`.
E7M0 has no mantissa, hence no subnormals: `min_subnormal == min_normal` (2**-62).
"""

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class FloatFormat:
    """An 8-bit float format; all magnitudes are exact powers of two or sums of them."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_finite: float
    min_normal: float
    min_subnormal: float
    has_inf: bool
    has_nan: bool
    dtype: type | None  # the ml_dtypes scalar type, None for the exotic formats

    @property
    def dynamic_range_log2(self) -> float:
        """log2(max_finite / min_subnormal): the span of nonzero magnitudes in octaves."""
        return float(np.log2(self.max_finite / self.min_subnormal))


def _layout_limits(exponent_bits: int, mantissa_bits: int, bias: int, top_codes_reserved: int):
    """(max_finite, min_normal, min_subnormal) from the bit layout.

    `top_codes_reserved` is how many codes at the top of the magnitude range are not finite
    numbers: 0 for all-finite formats, 1 for E4M3fn (NaN only), 2**M for IEEE-like formats
    (their whole top exponent is inf/NaN).
    """
    min_subnormal = 2.0 ** (1 - bias - mantissa_bits)
    min_normal = 2.0 ** (1 - bias)
    if exponent_bits == 0:
        return (2**mantissa_bits - 1) * min_subnormal, min_normal, min_subnormal
    top_magnitude_code = 2 ** (exponent_bits + mantissa_bits) - 1 - top_codes_reserved
    exponent_field, mantissa_field = divmod(top_magnitude_code, 2**mantissa_bits)
    max_finite = (1 + mantissa_field / 2**mantissa_bits) * 2.0 ** (exponent_field - bias)
    if mantissa_bits == 0:
        min_subnormal = min_normal  # no mantissa field, so exponent field 0 holds only zero
    return max_finite, min_normal, min_subnormal


def _make(name, exponent_bits, mantissa_bits, dtype=None):
    if dtype is None:
        bias = 1 if exponent_bits == 0 else 2 ** (exponent_bits - 1) - 1
        reserved, has_inf, has_nan = 0, False, False
    else:
        bias = 2 ** (exponent_bits - 1) - 1
        info = ml_dtypes.finfo(dtype)
        has_inf = bool(np.isinf(np.array(np.inf).astype(dtype)))
        has_nan = True
        reserved = 2**mantissa_bits if has_inf else 1
    max_finite, min_normal, min_subnormal = _layout_limits(
        exponent_bits, mantissa_bits, bias, reserved
    )
    if dtype is not None:  # the layout arithmetic must agree with ml_dtypes itself
        expected = (float(info.max), float(info.tiny), float(info.smallest_subnormal))
        if (max_finite, min_normal, min_subnormal) != expected or info.nmant != mantissa_bits:
            raise AssertionError(f"{name}: layout limits disagree with ml_dtypes.finfo")
    return FloatFormat(
        name=name,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        bias=bias,
        max_finite=max_finite,
        min_normal=min_normal,
        min_subnormal=min_subnormal,
        has_inf=has_inf,
        has_nan=has_nan,
        dtype=dtype,
    )


FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        _make("E5M2", 5, 2, ml_dtypes.float8_e5m2),
        _make("E4M3", 4, 3, ml_dtypes.float8_e4m3fn),
        _make("E3M4", 3, 4, ml_dtypes.float8_e3m4),
        _make("E0M7", 0, 7),
        _make("E1M6", 1, 6),
        _make("E2M5", 2, 5),
        _make("E6M1", 6, 1),
        _make("E7M0", 7, 0),
    )
}


def get_format(name_or_format: "str | FloatFormat") -> FloatFormat:
    """The format of that name (case-insensitive); a FloatFormat is returned as it is."""
    if isinstance(name_or_format, FloatFormat):
        return name_or_format
    if isinstance(name_or_format, str):
        found = FORMATS.get(name_or_format.strip().upper())
        if found is not None:
            return found
    raise ValueError(
        f"unknown float format {name_or_format!r}; valid names: {', '.join(FORMATS)}"
    )
