"""quantized_matmul / layer_matmul: y, dx, dw and the per-slot statistics against NumPy, which
rounds with ml_dtypes (E5M2, E4M3, E3M4) or by exhaustive search of the code table (E2M5, E7M0)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax.quant import FORMATS, LayerRecipe, SlotRecipe, layer_matmul, quantized_matmul
from altgrad_jax.quant.counts import N_STATS, STATS
from tests._reference import reference_quantize

RNG = np.random.default_rng(7)
X = (RNG.standard_normal((2, 3, 16)) * 3).astype(np.float32)
W = (RNG.standard_normal((16, 5)) * 0.05).astype(np.float32)
DY = (RNG.standard_normal((2, 3, 5)) * 1e-3).astype(np.float32)
MARGIN = 1.05


def _np_scale(t, fmt_name, mode):
    if mode == "none":
        return np.float32(1.0)
    amax = np.float32(np.max(np.abs(t)))
    if mode == "delayed":  # a stale history: half of today's amax, so some values saturate
        amax = amax * np.float32(0.5)
    return amax * np.float32(MARGIN) * np.float32(1 / FORMATS[fmt_name].max_finite)


def _np_q(t, fmt_name, scale):
    return t if fmt_name is None else reference_quantize(t, FORMATS[fmt_name], scale)


def _assert_product_close(actual, a, b, expected):
    """float32 accumulation: allow a few ulps of sum |a_i b_i| per output element."""
    bound = 1e-6 * (np.abs(a) @ np.abs(b)) + 1e-30
    np.testing.assert_array_less(np.abs(np.asarray(actual, np.float64) - expected), bound * 4 + 1e-12)


def _reference(formats, scales):
    (fx, fw, fdy), (sx, sw, sdy) = formats, scales
    xq = _np_q(X, fx, sx).reshape(-1, 16).astype(np.float64)
    wq = _np_q(W, fw, sw).astype(np.float64)
    dyq = _np_q(DY, fdy, sdy).reshape(-1, 5).astype(np.float64)
    return xq, wq, dyq


def _run(fn):
    cotangent = jnp.asarray(DY)
    y, vjp = jax.vjp(fn, jnp.asarray(X), jnp.asarray(W))
    dx, dw = vjp(cotangent)
    return np.asarray(y), np.asarray(dx), np.asarray(dw)


SLOT_CASES = [
    ("E4M3", "E4M3", "E5M2"),  # the hybrid recipe
    ("E4M3", None, None), (None, "E4M3", None), (None, None, "E5M2"),  # each slot alone
    ("E5M2", "E5M2", "E5M2"), ("E3M4", "E3M4", "E3M4"), ("E2M5", "E2M5", "E2M5"), ("E7M0", "E7M0", "E7M0"),
]


@pytest.mark.parametrize("formats", SLOT_CASES, ids=lambda f: "-".join(str(s) for s in f))
@pytest.mark.parametrize("mode", ["delayed", "current", "none"])
def test_given_scales_match_numpy(formats, mode):
    scales = [_np_scale(t, f, mode) if f else np.float32(1.0) for t, f in zip((X, W, DY), formats)]
    y, dx, dw = _run(lambda x, w: quantized_matmul(x, w, *formats, *scales))
    xq, wq, dyq = _reference(formats, scales)
    _assert_product_close(y.reshape(-1, 5), xq, wq, xq @ wq)
    _assert_product_close(dx.reshape(-1, 16), dyq, wq.T, dyq @ wq.T)
    _assert_product_close(dw, xq.T, dyq, xq.T @ dyq)
    if formats[2] is not None and mode != "none":  # dy really reaches dw: differs from float32 dy
        assert not np.allclose(dw, xq.T @ DY.reshape(-1, 5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("formats", SLOT_CASES[:4] + [("E2M5", "E7M0", "E3M4")], ids=lambda f: "-".join(str(s) for s in f))
def test_current_scaling_inside_the_matmul_uses_each_tensors_own_amax(formats):
    recipe = LayerRecipe(*(SlotRecipe(f, "current") for f in formats), margin=MARGIN)
    y, dx, dw = _run(lambda x, w: layer_matmul(x, w, recipe, jnp.zeros(3)))
    scales = [_np_scale(t, f, "current") if f else np.float32(1.0) for t, f in zip((X, W, DY), formats)]
    xq, wq, dyq = _reference(formats, scales)
    _assert_product_close(y.reshape(-1, 5), xq, wq, xq @ wq)
    _assert_product_close(dx.reshape(-1, 16), dyq, wq.T, dyq @ wq.T)
    _assert_product_close(dw, xq.T, dyq, xq.T @ dyq)


def _np_stats(t, fmt_name, scale):
    fmt = FORMATS[fmt_name]
    q = _np_q(t, fmt_name, scale)
    scaled = np.abs(t.astype(np.float32) * (np.float32(1) / np.float32(scale)))
    nonzero = t != 0
    return {
        "overflow": np.sum(scaled > fmt.max_finite), "underflow": np.sum(nonzero & (q == 0)),
        "nonzero": np.sum(nonzero), "elements": t.size, "amax": np.max(np.abs(t)),
        "rel_err": np.linalg.norm((q - t).astype(np.float64)) / np.linalg.norm(t.astype(np.float64)),
    }


@pytest.mark.parametrize("formats", [("E4M3", "E4M3", "E5M2"), ("E3M4", "E2M5", "E4M3")])
def test_probe_gradient_is_the_statistics_of_each_slot(formats):
    scales = [_np_scale(t, f, "delayed") for t, f in zip((X, W, DY), formats)]
    # dy: a coarse scale that puts amax(dy) 4 smallest subnormals up, so its small values flush
    scales[2] = np.float32(np.max(np.abs(DY)) / (4 * FORMATS[formats[2]].min_subnormal))
    recipe = LayerRecipe(*(SlotRecipe(f, "delayed") for f in formats), margin=MARGIN)

    def loss(x, w, probe):
        return jnp.sum(layer_matmul(x, w, recipe, jnp.asarray(scales), probe) * DY)

    stats = np.asarray(jax.grad(loss, argnums=2)(jnp.asarray(X), jnp.asarray(W), jnp.zeros((3, 1, N_STATS))))[:, 0]
    for row, (t, fmt_name, scale) in enumerate(zip((X, W, DY), formats, scales)):
        expected = _np_stats(t, fmt_name, scale)
        got = dict(zip(STATS, stats[row]))
        for name in ("overflow", "underflow", "nonzero", "elements"):
            assert got[name] == expected[name], (row, name)
        assert got["amax"] == expected["amax"]
        assert np.sqrt(got["err_sq"] / got["norm_sq"]) == pytest.approx(expected["rel_err"], rel=1e-4)
    assert stats[0, 0] > 0 and stats[2, 1] > 0  # the stale x scale saturates, the coarse dy scale flushes


def test_without_formats_it_is_the_float32_matmul_and_the_gradient_is_unquantized():
    y, dx, dw = _run(lambda x, w: quantized_matmul(x, w))
    np.testing.assert_array_equal(y, np.asarray(jnp.asarray(X) @ jnp.asarray(W)))
    _, vjp = jax.vjp(lambda x, w: x @ w, jnp.asarray(X), jnp.asarray(W))
    for got, want in zip((dx, dw), vjp(jnp.asarray(DY))):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-9)


def test_hardware_path_equals_the_simulated_one_on_the_cpu():
    scales = jnp.asarray([_np_scale(t, f, "current") for t, f in zip((X, W, DY), ("E4M3", "E4M3", "E5M2"))])
    simulated = LayerRecipe(SlotRecipe("E4M3"), SlotRecipe("E4M3"), SlotRecipe("E5M2"), margin=MARGIN)
    hardware = simulated._replace(hardware=True)
    for a, b in zip(_run(lambda x, w: layer_matmul(x, w, simulated, scales)),
                    _run(lambda x, w: layer_matmul(x, w, hardware, scales))):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6 * np.abs(b).max())  # float32 sums in another order


def test_bad_shapes_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"x \[..., K\] and w \[K, N\]"):
        quantized_matmul(X, W.T, "E4M3", "E4M3", "E5M2")
