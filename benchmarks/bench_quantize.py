"""Fake-quantization throughput per format against a plain copy of the same float32 array.

    python benchmarks/bench_quantize.py [--quick] [--reps N]

For each size (1M, 4M, 16M, 64M elements; --quick: 1M, 4M) all candidates run interleaved,
round after round, after a burn-in; each figure is the median over the rounds. Printed: one JSON
object. Per format and size: `ratio_to_copy` of `quantize(x, fmt, scale)` (traced scale, as the
model calls it) to the copy floor: the faster of the jitted `x * 1.0` (which XLA makes a plain
copy) and `-x` (a one-op elementwise fusion); both read, allocate and write the array. Also
elements/s. `in_place_ratio`: both with the input donated (floor: `-x` in place), the
arithmetic cost without the page faults of a fresh output buffer. For the ml_dtypes formats,
`astype_round_trip_ratio_to_copy` and `reduce_precision_ratio_to_copy` time the alternatives
(XLA's float8 round trip and `lax.reduce_precision`), and `alternatives_exact` says which of
them equal quantize bit for bit. `counts_ratio_to_sum_squares`: quantization_counts against a
fused sum of squares (one reduction pass); `quantize_and_counts_ratio_to_copy`: both in one jit,
as the train step calls them.
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from altgrad_jax.quant.formats import FORMATS
from altgrad_jax.quant import quantization_counts, quantize

TARGET_RATIO_TO_COPY = 4.0


def _clipped(x, fmt):
    return jnp.clip(x, -fmt.max_finite, fmt.max_finite)


def candidates(formats):
    """name -> (jitted function of (x, scale), donates x)."""
    jit = jax.jit
    fns = {
        "copy": (jit(lambda x, s: x * 1.0), False),
        "negate": (jit(lambda x, s: -x), False),
        "copy_in_place": (jit(lambda x, s: -x, donate_argnums=0), True),
        "sum_squares": (jit(lambda x, s: jnp.sum(x * x)), False),
    }
    for name in formats:
        fmt = FORMATS[name]
        fns[f"quantize/{name}"] = (jit(lambda x, s, f=fmt: quantize(x, f, s)), False)
        fns[f"quantize_in_place/{name}"] = (
            jit(lambda x, s, f=fmt: quantize(x, f, s), donate_argnums=0),
            True,
        )
        fns[f"counts/{name}"] = (jit(lambda x, s, f=fmt: quantization_counts(x, f, s)), False)
        fns[f"quantize_and_counts/{name}"] = (
            jit(lambda x, s, f=fmt: (quantize(x, f, s), quantization_counts(x, f, s))),
            False,
        )
        if fmt.dtype is not None:
            fns[f"astype_round_trip/{name}"] = (_astype_round_trip(fmt), False)
            fns[f"reduce_precision/{name}"] = (_reduce_precision(fmt), False)
    return fns


def exactness(formats):
    """Whether each alternative equals quantize bit for bit on every code, midpoint and neighbour
    of an ml_dtypes format (the tests check quantize itself against ml_dtypes)."""
    out = {}
    for name in formats:
        fmt = FORMATS[name]
        if fmt.dtype is None:
            continue
        grid = np.arange(256, dtype=np.uint8).view(fmt.dtype).astype(np.float64)
        grid = np.unique(grid[np.isfinite(grid)])
        mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
        x = np.concatenate([grid.astype(np.float32), mids, np.nextafter(mids, np.float32(0))])
        x = jnp.asarray(np.concatenate([x, x * 4, [np.inf, np.nan]]).astype(np.float32))
        want = np.asarray(quantize(x, fmt, 1.0)).view(np.uint32)
        one = jnp.float32(1.0)
        out[name] = {
            alt: bool(np.array_equal(np.asarray(fn(x, one)).view(np.uint32), want))
            for alt, fn in (
                ("astype_round_trip", _astype_round_trip(fmt)),
                ("reduce_precision", _reduce_precision(fmt)),
            )
        }
    return out


def _astype_round_trip(fmt):
    return jax.jit(lambda x, s: _clipped(x / s, fmt).astype(fmt.dtype).astype(jnp.float32) * s)


def _reduce_precision(fmt):
    return jax.jit(
        lambda x, s: lax.reduce_precision(_clipped(x / s, fmt), fmt.exponent_bits, fmt.mantissa_bits) * s
    )


def time_size(n, fns, reps, seed=0):
    host = (np.random.default_rng(seed).standard_normal(n) * 3).astype(np.float32)
    shared = jnp.asarray(host)
    scale = jnp.float32(0.0123)  # puts the normal samples across most formats' ranges
    own = {k: jnp.asarray(host) for k, (_, donates) in fns.items() if donates}

    def run(key):
        fn, donates = fns[key]
        start = time.perf_counter()
        if donates:
            own[key] = fn(own[key], scale)
            jax.block_until_ready(own[key])
        else:
            jax.block_until_ready(fn(shared, scale))
        return time.perf_counter() - start

    for key in fns:  # burn-in: compile and touch the memory once
        run(key)
        run(key)
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key in fns:
            times[key].append(run(key))
    return {key: statistics.median(t) for key, t in times.items()}


def summarize(n, med, formats):
    # XLA turns x * 1.0 into a plain copy, which on the CPU can be slower than a one-op
    # elementwise fusion such as -x; the floor is the faster of the two.
    copy = min(med["copy"], med["negate"])
    in_place, sum_sq = med["copy_in_place"], med["sum_squares"]
    per_format = {}
    for name in formats:
        q = med[f"quantize/{name}"]
        entry = {
            "ratio_to_copy": round(q / copy, 3),
            "elements_per_s": round(n / q),
            "in_place_ratio": round(med[f"quantize_in_place/{name}"] / in_place, 3),
            "counts_ratio_to_sum_squares": round(med[f"counts/{name}"] / sum_sq, 3),
            "quantize_and_counts_ratio_to_copy": round(med[f"quantize_and_counts/{name}"] / copy, 3),
        }
        if f"astype_round_trip/{name}" in med:
            entry["astype_round_trip_ratio_to_copy"] = round(med[f"astype_round_trip/{name}"] / copy, 3)
            entry["reduce_precision_ratio_to_copy"] = round(med[f"reduce_precision/{name}"] / copy, 3)
        per_format[name] = entry
    return {
        "copy_ms": round(med["copy"] * 1e3, 3),
        "negate_ms": round(med["negate"] * 1e3, 3),
        "floor_ms": round(copy * 1e3, 3),
        "floor_elements_per_s": round(n / copy),
        "copy_in_place_ms": round(in_place * 1e3, 3),
        "sum_squares_ms": round(sum_sq * 1e3, 3),
        "formats": per_format,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1M and 4M only")
    parser.add_argument("--reps", type=int, default=9, help="timed rounds per size (median)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated names")
    args = parser.parse_args()
    formats = [f.strip().upper() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; valid: {', '.join(FORMATS)}")
    sizes = [2**20, 2**22] if args.quick else [2**20, 2**22, 2**24, 2**26]

    fns = candidates(formats)
    results = {}
    for n in sizes:
        results[f"{n // 2**20}M"] = summarize(n, time_size(n, fns, args.reps), formats)
    worst = max(
        entry["ratio_to_copy"] for size in results.values() for entry in size["formats"].values()
    )
    print(
        json.dumps(
            {
                "benchmark": "quantize",
                "device": str(jax.devices()[0].device_kind),
                "platform": jax.default_backend(),
                "host": platform.machine(),
                "jax": jax.__version__,
                "reps": args.reps,
                "target_ratio_to_copy": TARGET_RATIO_TO_COPY,
                "worst_ratio_to_copy": worst,
                "meets_target": worst <= TARGET_RATIO_TO_COPY,
                "alternatives_exact": exactness(formats),
                "sizes": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
