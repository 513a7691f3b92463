"""Independent NumPy references for the 8-bit formats: the code table from the bit layout alone,
nearest rounding by exhaustive search, and ml_dtypes' own cast."""

import numpy as np


def layout_code_values(fmt) -> np.ndarray:
    """The nonnegative finite code values, code c at index c, decoded from the bit layout alone
    (for the ml_dtypes formats the inf/NaN codes at the top are left out)."""
    mantissa_steps = 2**fmt.mantissa_bits
    values = []
    for code in range(128):
        exponent_field, mantissa_field = divmod(code, mantissa_steps)
        if exponent_field == 0:
            values.append(mantissa_field * 2.0 ** (1 - fmt.bias - fmt.mantissa_bits))
        else:
            values.append((1 + mantissa_field / mantissa_steps) * 2.0 ** (exponent_field - fmt.bias))
    values = np.array(values)
    return values[values <= fmt.max_finite]


def brute_force_round(x: np.ndarray, fmt) -> np.ndarray:
    """Nearest code value by exhaustive search, ties to the even code, saturating, NaN kept."""
    codes = layout_code_values(fmt)
    magnitude = np.minimum(np.abs(x.astype(np.float64)), codes[-1])
    distance = np.abs(magnitude[:, None] - codes[None, :])
    nearest = distance == distance.min(axis=1, keepdims=True)
    even = nearest & (np.arange(codes.size) % 2 == 0)
    chosen = np.where(even.any(axis=1), even.argmax(axis=1), nearest.argmax(axis=1))
    out = np.copysign(codes[chosen], x).astype(np.float32)
    out[np.isnan(x)] = np.nan
    return out


def ml_dtypes_round(x: np.ndarray, fmt) -> np.ndarray:
    return np.clip(x, -fmt.max_finite, fmt.max_finite).astype(fmt.dtype).astype(np.float32)


def assert_bitwise_equal(actual, expected, x):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    same = (actual.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(actual) & np.isnan(expected))
    bad = np.flatnonzero(~same)
    assert bad.size == 0, f"{bad.size} mismatches, e.g. x={x[bad[:4]]} got {actual[bad[:4]]} want {expected[bad[:4]]}"




def reference_round(x, fmt) -> np.ndarray:
    """Nearest rounding by ml_dtypes where it has the format, else by exhaustive search."""
    x = np.asarray(x, np.float32)
    if fmt.dtype is not None:
        return ml_dtypes_round(x, fmt)
    return brute_force_round(x.reshape(-1), fmt).reshape(x.shape)


def reference_quantize(t, fmt, scale) -> np.ndarray:
    """scale * q(t * (1 / scale)) in float32, the reciprocal rounded once, as the bench does."""
    scale = np.float32(scale)
    inverse = np.float32(1.0) / scale
    return (reference_round(np.asarray(t, np.float32) * inverse, fmt) * scale).astype(np.float32)
