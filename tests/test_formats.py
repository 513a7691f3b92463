"""Format limits against ml_dtypes and against values worked out by hand from the bit layouts."""

import ml_dtypes
import pytest

from altgrad_jax.quant.formats import FORMATS, FloatFormat, get_format

ML_DTYPES = {"E5M2": ml_dtypes.float8_e5m2, "E4M3": ml_dtypes.float8_e4m3fn, "E3M4": ml_dtypes.float8_e3m4}

# (max_finite, min_normal, min_subnormal) from the layouts in the formats.py docstring.
EXOTIC_LIMITS = {
    "E0M7": (127 / 128, 1.0, 1 / 128),  # fixed point, no normals
    "E1M6": (2 * (1 + 63 / 64), 2.0, 1 / 32),  # bias 0
    "E2M5": (2**2 * (1 + 31 / 32), 1.0, 1 / 32),  # bias 1
    "E6M1": (2**32 * 1.5, 2.0**-30, 2.0**-31),  # bias 31
    "E7M0": (2.0**64, 2.0**-62, 2.0**-62),  # bias 63, no subnormals
}


def test_registry_holds_the_eight_formats_with_8_bits_each():
    assert set(FORMATS) == set(ML_DTYPES) | set(EXOTIC_LIMITS)
    for fmt in FORMATS.values():
        assert 1 + fmt.exponent_bits + fmt.mantissa_bits == 8


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_ml_dtypes_formats_match_finfo(name):
    fmt, info = FORMATS[name], ml_dtypes.finfo(ML_DTYPES[name])
    assert fmt.dtype is ML_DTYPES[name]
    assert fmt.max_finite == float(info.max)
    assert fmt.min_normal == float(info.tiny)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.mantissa_bits == info.nmant
    assert fmt.has_nan


def test_e4m3_is_the_ocp_fn_variant():
    fmt = FORMATS["E4M3"]
    assert (fmt.max_finite, fmt.has_inf) == (448.0, False)
    assert fmt.dynamic_range_log2 == pytest.approx(17.807, abs=1e-3)  # log2(448 * 2**9)
    assert FORMATS["E5M2"].has_inf and FORMATS["E5M2"].max_finite == 57344.0


@pytest.mark.parametrize("name", sorted(EXOTIC_LIMITS))
def test_exotic_formats_limits_from_layout(name):
    fmt = FORMATS[name]
    assert (fmt.max_finite, fmt.min_normal, fmt.min_subnormal) == EXOTIC_LIMITS[name]
    assert fmt.dtype is None and not fmt.has_inf and not fmt.has_nan
    if fmt.exponent_bits:
        assert fmt.bias == 2 ** (fmt.exponent_bits - 1) - 1


def test_get_format_is_case_insensitive_and_passes_formats_through():
    assert get_format("e4m3") is FORMATS["E4M3"]
    assert get_format(FORMATS["E7M0"]) is FORMATS["E7M0"]
    custom = FloatFormat("X", 4, 3, 7, 448.0, 2**-6, 2**-9, False, True, None)
    assert get_format(custom) is custom


@pytest.mark.parametrize("bad", ["E4M4", "", None, 8])
def test_get_format_rejects_unknown_names_listing_valid_ones(bad):
    with pytest.raises(ValueError, match="unknown float format.*E5M2, E4M3"):
        get_format(bad)
