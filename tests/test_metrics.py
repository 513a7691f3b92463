"""Metrics against independent NumPy float64 computations."""

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import tree_util

from altgrad_jax.metrics import compute_gradient_stats, compute_stability_metrics, gradient_cosine_similarity
from altgrad_jax.tree_names import key_path_name

THRESHOLD = 1e-8
T32 = np.float32(THRESHOLD)  # the threshold as the float32 gradients see it


def random_tree(seed: int) -> dict:
    """Nested dicts and lists with the awkward leaves the metrics must get right."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0, loc=0.0):
        return (loc + scale * rng.standard_normal(shape)).astype(np.float32)

    at_threshold = np.array([T32, -T32, np.nextafter(T32, np.float32(0)),
                             np.nextafter(T32, np.float32(1)), 0.0, 1.0], np.float32)
    return {
        "wte": {"embedding": normal(13, 8)},
        "h": [
            {"attn": {"kernel": normal(8, 24, scale=0.02)}, "ln_1": {"scale": np.zeros(8, np.float32)}},
            {"attn": {"kernel": normal(8, 24, loc=0.5, scale=0.1)},
             "ln_1": {"scale": normal(8, scale=1e-9)}},
        ],
        "at_threshold": at_threshold,
        "mixed_dead": np.where(rng.random((7, 9)) < 0.3, normal(7, 9, scale=1e-9), normal(7, 9)),
        # |mean| >> std: a naive E[g²] - E[g]² cancels to garbage here.
        "offset": normal(257, scale=1e-3, loc=100.0),
        "constant": np.full((3, 5), 0.75, np.float32),
        "scalar": np.float32(-2.5),
    }


@np.errstate(invalid="ignore")
def numpy_stats(tree, threshold=THRESHOLD) -> dict:
    expected, l2, linf, dead, snr = {}, [], [], [], []
    for path, leaf in tree_util.tree_flatten_with_path(tree)[0]:
        name = key_path_name(path)
        g = np.asarray(leaf, np.float64).reshape(-1)
        std = g.std()
        values = {
            "grad_norm_l2": np.sqrt(np.sum(g * g)),
            "grad_norm_linf": np.max(np.abs(g)),
            "dead_neuron_frac": np.count_nonzero(np.abs(np.asarray(leaf)) < np.float32(threshold)) / g.size,
            "grad_snr": abs(g.mean()) / std if std > 1e-10 else 0.0,
        }
        for metric, value in values.items():
            expected[f"{metric}/{name}"] = value
        l2.append(values["grad_norm_l2"])
        linf.append(values["grad_norm_linf"])
        dead.append(values["dead_neuron_frac"])
        snr.append(values["grad_snr"])
    expected |= {
        "grad_norm_l2/mean": np.mean(l2), "grad_norm_l2/min": np.min(l2),
        "grad_norm_linf/max": np.max(linf), "dead_neuron_frac/mean": np.mean(dead),
        "grad_snr/mean": np.mean(snr), "grad_snr/min": np.min(snr),
        "grad_norm": np.sqrt(np.sum(np.square(l2))),
    }
    return expected


def assert_metrics_close(actual: dict, expected: dict, rtol=2e-5, atol=1e-12):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert jnp.shape(actual[name]) == (), name
        np.testing.assert_allclose(np.asarray(actual[name], np.float64), value,
                                   rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_stats_match_numpy(seed):
    tree = random_tree(seed)
    actual = jax.jit(compute_gradient_stats)(tree)
    assert_metrics_close(actual, numpy_stats(tree))


def test_gradient_stats_edge_leaves():
    stats = jax.jit(compute_gradient_stats)(random_tree(0))
    assert stats["grad_norm_l2/h/0/ln_1/scale"] == 0.0
    assert stats["dead_neuron_frac/h/0/ln_1/scale"] == 1.0
    assert stats["grad_snr/h/0/ln_1/scale"] == 0.0
    assert stats["dead_neuron_frac/h/1/ln_1/scale"] == 1.0
    # ±T and 0 are below or at it: only the values strictly below count (0, nextafter down).
    assert stats["dead_neuron_frac/at_threshold"] == np.float32(2 / 6)
    assert stats["grad_snr/constant"] == 0.0
    assert stats["grad_snr/scalar"] == 0.0


def large_leaf_tree(seed: int) -> dict:
    """Larger leaves with what the statistics must get right: values at and just below the dead
    threshold, max|g| above 1, a NaN, an inf, |mean| >> std, a constant leaf, zeros, tiny values."""
    rng = np.random.default_rng(seed)

    def with_dead(values):
        flat = values.reshape(-1)
        idx = rng.choice(flat.size, size=flat.size // 10, replace=False)
        flat[idx[0::4]] = 0.0
        flat[idx[1::4]] = np.float32(T32) * rng.choice([-1, 1], size=idx[1::4].size)
        flat[idx[2::4]] = np.nextafter(T32, np.float32(0)) * rng.choice([-1, 1], size=idx[2::4].size)
        flat[idx[3::4]] = rng.uniform(-1, 1, size=idx[3::4].size) * T32
        return values

    def normal(*shape, scale=1.0, loc=0.0):
        return (loc + scale * rng.standard_normal(shape)).astype(np.float32)

    with_nan = with_dead(normal(64, 80, scale=1e-3))
    with_nan[3, 5] = np.nan
    with_inf = with_dead(normal(64, 80, scale=1e-3))
    with_inf[7, 1] = -np.inf
    return {
        "small_values": with_dead(normal(96, 64, scale=1e-3)),
        "large_values": with_dead(normal(80, 64, scale=3.0)),
        "with_nan": with_nan,
        "with_inf": with_inf,
        "offset": normal(8192, scale=1e-2, loc=10.0),             # |mean| >> std: E[g²] - E[g]² cancels
        "constant": np.full((64, 128), 0.1, np.float32),
        "zeros": np.zeros((4096, 2), np.float32),
        "tiny": normal(4096, scale=1e-12),
    }


def test_large_leaves_match_numpy():
    tree = large_leaf_tree(11) | random_tree(11)
    assert_metrics_close(jax.jit(compute_gradient_stats)(tree), numpy_stats(tree), rtol=1e-5)


@pytest.mark.parametrize("scale", [2.0**-40, 2.0**40])
def test_small_and_large_magnitudes_match_numpy(scale):
    """Every statistic at |g| ~ 1e-15 and ~ 1e12 (a power of two keeps the values exact), where
    Σg² and the variance still fit in float32: at 1e12 the SNR of the |mean| >> std leaf must
    survive (at 1e-15 every std is below the 1e-10 floor, so every SNR is 0, as in NumPy)."""
    tree = {name: leaf * np.float32(scale) for name, leaf in large_leaf_tree(14).items()
            if name != "tiny"}  # its squares would be subnormal here
    # rtol 2e-5: the order of the float32 sums, which XLA's code generation picks (the suite's
    # unoptimised one differs from the default), moves the SNR of the ~1e12 leaf by up to 1.5e-5.
    assert_metrics_close(jax.jit(compute_gradient_stats)(tree), numpy_stats(tree), rtol=2e-5, atol=0)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 2.5])
def test_static_thresholds_on_large_leaves(threshold):
    tree = large_leaf_tree(12)
    stats = jax.jit(functools.partial(compute_gradient_stats, threshold=threshold))(tree)
    expected = numpy_stats(tree, threshold)
    for name in tree:
        assert float(stats[f"dead_neuron_frac/{name}"]) == pytest.approx(
            expected[f"dead_neuron_frac/{name}"], rel=1e-6, abs=0), name


def test_leaves_of_millions_of_values_match_numpy():
    """Float32 sums over 4M values: the norms, means and variances must stay within NumPy's rtol."""
    rng = np.random.default_rng(21)
    small = (1e-3 * rng.standard_normal((4099, 1025))).astype(np.float32)
    small[rng.random(small.shape) < 0.05] = 0.0
    small[::7, 3] = T32
    small[::5, 4] = np.nextafter(T32, np.float32(0))
    large = (2.0 * rng.standard_normal((2053, 2049))).astype(np.float32)
    large[rng.random(large.shape) < 0.01] = 1e-9
    tree = {"small": small, "large": large}
    assert_metrics_close(jax.jit(compute_gradient_stats)(tree), numpy_stats(tree), rtol=1e-4)


def test_dead_count_above_float32_integer_range():
    """A float32 sum of ones stops at 2**24; the count is an int32, so only the final fraction
    rounds (float32 spacing near 2**24 is 2)."""
    g = jnp.zeros((4097, 4096), jnp.float32).at[0, :5].set(0.5)
    frac = jax.jit(compute_gradient_stats)({"g": g})["dead_neuron_frac/g"]
    assert abs(float(frac) * g.size - (g.size - 5)) <= 2


def test_bad_threshold_raises():
    with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
        compute_gradient_stats({"g": np.ones(3, np.float32)}, threshold=-1e-8)


def test_dead_fraction_is_an_exact_count():
    rng = np.random.default_rng(3)
    n = 100_003
    g = rng.standard_normal(n).astype(np.float32)
    dead_idx = rng.choice(n, size=12_345, replace=False)
    g[dead_idx] = rng.uniform(-0.99, 0.99, dead_idx.size).astype(np.float32) * T32
    g[:5] = [T32, -T32, np.nextafter(T32, np.float32(0)), -np.nextafter(T32, np.float32(0)), 0.0]
    frac = jax.jit(compute_gradient_stats)({"g": g})["dead_neuron_frac/g"]
    count = np.count_nonzero(np.abs(g) < T32)
    # The count survives the float32 fraction exactly (any other count is > 1 ulp away).
    assert round(float(frac) * n) == count
    np.testing.assert_allclose(float(frac), count / n, rtol=2e-7)


def test_custom_threshold():
    g = np.array([0.0, 0.05, -0.1, 0.2, -0.3], np.float32)
    stats = jax.jit(compute_gradient_stats)({"g": g}, threshold=0.1)
    assert float(stats["dead_neuron_frac/g"]) == np.float32(2 / 5)


def test_jit_and_eager_agree():
    full = random_tree(5)
    tree = {"kernel": full["h"][1]["attn"]["kernel"], "offset": full["offset"]}
    jitted = jax.jit(compute_gradient_stats)(tree)
    eager = compute_gradient_stats(tree)
    for name in jitted:
        np.testing.assert_allclose(eager[name], jitted[name], rtol=1e-6, err_msg=name)
    a, b = tree, jax.tree.map(lambda x: np.asarray(x)[::-1] + np.float32(0.5), tree)
    jitted = jax.jit(gradient_cosine_similarity)(a, b)
    eager = gradient_cosine_similarity(a, b)
    for name in jitted:
        np.testing.assert_allclose(eager[name], jitted[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_metric_names_come_from_key_paths():
    class Pair(NamedTuple):
        first: np.ndarray
        second: np.ndarray

    class Opaque:  # registered without keys: its children get FlattenedIndexKey
        def __init__(self, children):
            self.children = children

    tree_util.register_pytree_node(Opaque, lambda o: (o.children, None), lambda _, c: Opaque(c))
    tree = {"h": [{"attn": {"kernel": 1.0}}], "pair": Pair(2.0, 3.0), "opaque": Opaque([4.0, 5.0])}
    names = {name.removeprefix("grad_norm_l2/") for name in compute_gradient_stats(tree)
             if name.startswith("grad_norm_l2/") and name not in ("grad_norm_l2/mean", "grad_norm_l2/min")}
    assert names == {"h/0/attn/kernel", "pair/first", "pair/second", "opaque/0", "opaque/1"}
    cosine_names = {name.removeprefix("grad_cos_sim/") for name in gradient_cosine_similarity(tree, tree)
                    if name.startswith("grad_cos_sim/")}
    assert cosine_names == names | {"mean", "min", "global"}


def numpy_agreement(a, b) -> dict:
    """The cosines and norm ratios of gradient_cosine_similarity, in float64 from the same values."""
    expected, cosines, dot, sq_a, sq_b = {}, [], 0.0, 0.0, 0.0
    for (path, x), (_, y) in zip(tree_util.tree_flatten_with_path(a)[0], tree_util.tree_flatten_with_path(b)[0]):
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        norm_x, norm_y = np.linalg.norm(x), np.linalg.norm(y)
        cos = float(x @ y / (norm_x * norm_y)) if norm_x * norm_y > 0 else 0.0
        expected[f"grad_cos_sim/{key_path_name(path)}"] = cos
        expected[f"grad_norm_ratio/{key_path_name(path)}"] = norm_x / norm_y if norm_y > 0 else 0.0
        cosines.append(cos)
        dot, sq_a, sq_b = dot + x @ y, sq_a + norm_x**2, sq_b + norm_y**2
    norms = np.sqrt(sq_a) * np.sqrt(sq_b)
    return expected | {
        "grad_cos_sim/mean": np.mean(cosines), "grad_cos_sim/min": np.min(cosines),
        "grad_cos_sim/global": dot / norms if norms > 0 else 0.0,
        "grad_norm_ratio/global": np.sqrt(sq_a / sq_b) if sq_b > 0 else 0.0,
    }


def disagreeing_pair(seed: int) -> tuple[dict, dict]:
    """A gradient tree and a 'shadow' that agrees with it well on the large leaves and badly on
    the small ones (one unrelated, two pointing the other way, one scaled by 1/4), so that
    the global cosine is far from the unweighted mean over leaves."""
    rng = np.random.default_rng(seed)
    a = random_tree(seed)

    def shadow(path, x):
        x = np.asarray(x)
        name = key_path_name(path)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if name == "h/1/ln_1/scale":
            return noise * np.float32(1e-9)  # unrelated to the gradient: cosine ~0
        if name == "scalar":
            return -3 * x
        if name == "at_threshold":
            return -x + np.float32(0.1) * noise
        if name == "constant":
            return np.float32(0.25) * x
        return x + np.float32(0.05) * np.abs(x).mean() * noise

    return a, tree_util.tree_map_with_path(shadow, a)


@pytest.mark.parametrize("seed", [1, 2])
def test_cosine_and_norm_ratio_match_numpy(seed):
    a, b = disagreeing_pair(seed)
    actual = jax.jit(gradient_cosine_similarity)(a, b)
    expected = numpy_agreement(a, b)
    assert_metrics_close(actual, expected, rtol=1e-5, atol=1e-6)
    # The global cosine weighs leaves by their norms; the mean gives each leaf one vote.
    assert expected["grad_cos_sim/global"] > 0.99 and expected["grad_cos_sim/mean"] < 0.7
    assert float(actual["grad_norm_ratio/constant"]) == pytest.approx(4.0, rel=1e-6)


@pytest.mark.parametrize("scale_a, scale_b", [(1e25, 1e25), (1e-20, 1e-20), (1e20, 1e-15), (1e-20, 1.0)])
def test_cosine_and_norm_ratio_at_extreme_magnitudes(scale_a, scale_b):
    """Σx² overflows (1e25) or underflows (1e-20) in float32; the values must not. (Elements stay
    normal: XLA:CPU flushes subnormals to zero.)"""
    a, b = disagreeing_pair(3)
    a = jax.tree.map(lambda x: (np.asarray(x, np.float64) * scale_a).astype(np.float32), a)
    b = jax.tree.map(lambda x: (np.asarray(x, np.float64) * scale_b).astype(np.float32), b)
    assert_metrics_close(jax.jit(gradient_cosine_similarity)(a, b), numpy_agreement(a, b), rtol=1e-5, atol=1e-6)


def test_cosine_with_itself_negation_and_zero():
    tree = random_tree(4)
    same = jax.jit(gradient_cosine_similarity)(tree, tree)
    negated = jax.jit(gradient_cosine_similarity)(tree, jax.tree.map(lambda x: -np.asarray(x), tree))
    for name, value in same.items():
        if name in ("grad_cos_sim/mean", "grad_cos_sim/min"):
            continue
        expected = 0.0 if name.endswith("/h/0/ln_1/scale") else 1.0  # a zero leaf
        sign = -1.0 if name.startswith("grad_cos_sim/") else 1.0
        assert float(value) == pytest.approx(expected, abs=1e-6), name
        assert float(negated[name]) == pytest.approx(sign * expected, abs=1e-6), name
    assert float(same["grad_cos_sim/min"]) == 0.0
    assert float(negated["grad_cos_sim/min"]) == pytest.approx(-1.0, abs=1e-6)


def test_zero_and_nonfinite_conventions():
    """0 where a norm is 0 (for the ratio: the shadow's norm), NaN from a NaN or inf element."""
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    a = {"zero_a": zeros, "zero_b": ones, "both_zero": zeros, "empty": np.zeros((0, 3), np.float32), "ok": ones}
    b = {"zero_a": ones, "zero_b": zeros, "both_zero": zeros, "empty": np.zeros((0, 3), np.float32), "ok": 2 * ones}
    metrics = {k: float(v) for k, v in jax.jit(gradient_cosine_similarity)(a, b).items()}
    for name in ("zero_a", "zero_b", "both_zero", "empty"):
        assert metrics[f"grad_cos_sim/{name}"] == 0.0 and metrics[f"grad_norm_ratio/{name}"] == 0.0, name
    assert metrics["grad_norm_ratio/ok"] == 0.5 and metrics["grad_cos_sim/ok"] == 1.0
    zero = jax.tree.map(np.zeros_like, b)
    metrics = {k: float(v) for k, v in jax.jit(gradient_cosine_similarity)(a, zero).items()}
    assert metrics["grad_cos_sim/global"] == 0.0 and metrics["grad_norm_ratio/global"] == 0.0
    a["large"] = b["large"] = np.ones((64, 80), np.float32)
    for bad, leaf in itertools.product((np.nan, np.inf, -np.inf), ("ok", "large")):
        broken = dict(b, **{leaf: b[leaf].copy()})
        broken[leaf].flat[1] = bad
        for pair in ((a, broken), (broken, a)):
            metrics = {k: float(v) for k, v in jax.jit(gradient_cosine_similarity)(*pair).items()}
            for name in (f"grad_cos_sim/{leaf}", f"grad_norm_ratio/{leaf}", "grad_cos_sim/global",
                         "grad_norm_ratio/global"):
                assert np.isnan(metrics[name]), (bad, name)
            assert metrics["grad_cos_sim/zero_a"] == 0.0


def test_cosine_rejects_mismatched_trees():
    a = {"x": np.ones(3, np.float32), "y": [np.ones(2, np.float32)]}
    with pytest.raises(ValueError, match="only in the first: \\['y/0'\\]"):
        gradient_cosine_similarity(a, {"x": np.ones(3, np.float32), "z": [np.ones(2, np.float32)]})
    with pytest.raises(ValueError, match="different containers"):
        gradient_cosine_similarity(a, {"x": np.ones(3, np.float32), "y": (np.ones(2, np.float32),)})
    with pytest.raises(ValueError, match="'y/0' has shape"):
        gradient_cosine_similarity(a, {"x": np.ones(3, np.float32), "y": [np.ones(4, np.float32)]})


def test_bad_gradient_trees_raise():
    with pytest.raises(ValueError, match="no array leaves"):
        compute_gradient_stats({})
    with pytest.raises(ValueError, match="'step' has non-float dtype"):
        compute_gradient_stats({"step": np.int32(3), "w": np.ones(2, np.float32)})


def test_stability_counts():
    params = {
        "a": np.array([1.0, np.nan, np.inf, -np.inf, np.nan, 0.0], np.float32),
        "b": [np.full((4, 4), np.nan, np.float32), np.ones(3, np.float32)],
        "step": np.int32(7),
    }
    metrics = jax.jit(compute_stability_metrics)(params)
    assert metrics["param_nan_count"].dtype == jnp.int32
    assert int(metrics["param_nan_count"]) == 2 + 16
    assert int(metrics["param_inf_count"]) == 2
    clean = jax.jit(compute_stability_metrics)(random_tree(0))
    assert int(clean["param_nan_count"]) == 0 and int(clean["param_inf_count"]) == 0


def test_stability_counts_on_large_leaves():
    """Large leaves go through the one-sum check; an overflowing sum must not invent counts."""
    rng = np.random.default_rng(8)
    broken = rng.standard_normal((128, 96)).astype(np.float32)
    nan_idx, inf_idx = rng.choice(broken.size, 37, replace=False), rng.choice(broken.size, 11, replace=False)
    broken.reshape(-1)[nan_idx] = np.nan
    broken.reshape(-1)[inf_idx] = np.inf
    huge = np.full((64, 96), 3e38, np.float32)  # finite, but its sum overflows to inf
    metrics = jax.jit(compute_stability_metrics)({"broken": broken, "huge": huge})
    assert int(metrics["param_nan_count"]) == np.count_nonzero(np.isnan(broken))
    assert int(metrics["param_inf_count"]) == np.count_nonzero(np.isinf(broken))
