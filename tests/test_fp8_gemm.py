"""The float8-operand path of layer_matmul (fp8_hardware_gemm) equals NumPy's product of the
ml_dtypes-cast operands and the simulated path; hlo_uses_fp8_gemm tells a real FP8 GEMM from the
silent fallback."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from altgrad_jax.quant import LayerRecipe, SlotRecipe, get_format, layer_matmul, quantized_matmul
from altgrad_jax.quant.hardware import check_hardware_recipe, fp8_gemm_count, hlo_uses_fp8_gemm

ML_DTYPES = {"E4M3": ml_dtypes.float8_e4m3fn, "E5M2": ml_dtypes.float8_e5m2}


def fp8_matmul(x, w, x_scale, w_scale, fmt_x="E4M3", fmt_w="E4M3", fmt_dy="E5M2", dy_scale=1.0):
    """layer_matmul on float8 operands with given (delayed) scales."""
    recipe = LayerRecipe(SlotRecipe(fmt_x), SlotRecipe(fmt_w), SlotRecipe(fmt_dy), hardware=True)
    return layer_matmul(x, w, recipe, jnp.asarray([x_scale, w_scale, dy_scale], jnp.float32))


def _operands(seed=0, shape=(3, 8, 48), n_out=32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((shape[-1], n_out)) * 0.05).astype(np.float32)
    x.flat[0] = 40.0  # an outlier well above the others: saturates with the scales below
    return x, w


def _numpy_reference(x, w, x_scale, w_scale, fmt_x, fmt_w):
    """float64 product of the ml_dtypes-cast operands: independent of JAX and of quantize.py."""
    def cast(a, scale, fmt):
        inverse = np.float32(1.0) / np.float32(scale)
        limit = get_format(fmt).max_finite
        return np.clip(a * inverse, -limit, limit).astype(ML_DTYPES[fmt]).astype(np.float64)

    xq, wq = cast(x, x_scale, fmt_x), cast(w, w_scale, fmt_w)
    exact = (xq @ wq) * (float(x_scale) * float(w_scale))
    magnitude = (np.abs(xq) @ np.abs(wq)) * (float(x_scale) * float(w_scale))
    return exact, magnitude


@pytest.mark.parametrize("fmt_x,fmt_w", [("E4M3", "E4M3"), ("E4M3", "E5M2"), ("E5M2", "E4M3")])
def test_matches_numpy_and_the_fake_quant_dot(fmt_x, fmt_w):
    x, w = _operands()
    # Scales that put the outlier beyond max_finite (it must saturate, not become inf/NaN).
    x_scale = np.float32(10.0 / get_format(fmt_x).max_finite)
    w_scale = np.float32(np.abs(w).max() / get_format(fmt_w).max_finite)
    y = np.asarray(jax.jit(fp8_matmul, static_argnums=(4, 5))(x, w, x_scale, w_scale, fmt_x, fmt_w))
    assert y.shape == (3, 8, 32) and y.dtype == np.float32 and np.isfinite(y).all()

    exact, magnitude = _numpy_reference(x, w, x_scale, w_scale, fmt_x, fmt_w)
    # float32 accumulation over K=48 products of exact fp8 values, then one scaling: |error| is
    # at most ~K ulps of sum |terms|.
    bound = 48 * np.finfo(np.float32).eps * magnitude + 1e-30
    assert np.all(np.abs(y - exact) <= bound)

    fake = np.asarray(quantized_matmul(x, w, fmt_x, fmt_w, None, x_scale, w_scale))
    assert np.all(np.abs(y - fake) <= 2 * bound)
    # The saturated outlier really changed the result (the test would see a missing clip).
    unclipped = (np.asarray(x, np.float64) / x_scale).max()
    assert unclipped > get_format(fmt_x).max_finite


def test_backward_products_take_float8_dy_and_equal_numpy():
    x, w = _operands(seed=1, shape=(4, 16), n_out=24)
    x_scale, w_scale = np.float32(2.0 / 448), np.float32(0.2 / 448)
    cotangent = np.random.default_rng(2).standard_normal((4, 24)).astype(np.float32)
    dy_scale = np.float32(np.abs(cotangent).max() / 57344.0)
    dx, dw = jax.grad(lambda x, w: jnp.sum(fp8_matmul(x, w, x_scale, w_scale, dy_scale=dy_scale) * cotangent),
                      argnums=(0, 1))(x, w)

    def cast(a, scale, fmt):
        limit = get_format(fmt).max_finite
        return np.clip(a * (np.float32(1) / scale), -limit, limit).astype(ML_DTYPES[fmt]).astype(np.float64) * scale

    xq, wq, dyq = cast(x, x_scale, "E4M3"), cast(w, w_scale, "E4M3"), cast(cotangent, dy_scale, "E5M2")
    np.testing.assert_allclose(dx, dyq @ wq.T, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, xq.T @ dyq, rtol=1e-5, atol=1e-7)
    assert not np.allclose(dw, xq.T @ cotangent, rtol=1e-4, atol=0)  # dy really was quantized


def test_nan_stays_nan():
    x, w = _operands(seed=3, shape=(2, 16), n_out=16)
    x[1, 3] = np.nan
    y = np.asarray(fp8_matmul(x, w, np.float32(0.01), np.float32(0.001), "E4M3", "E5M2"))
    assert np.isnan(y[1]).all() and np.isfinite(y[0]).all()


def test_bad_input_is_refused_with_a_clear_message():
    x, w = _operands(shape=(2, 16), n_out=8)
    with pytest.raises(ValueError, match="format E3M4 has no FP8 tensor-core GEMM"):
        fp8_matmul(x, w, 1.0, 1.0, "E3M4", "E4M3")
    with pytest.raises(ValueError, match=r"quantized_matmul needs x \[..., K\] and w \[K, N\]"):
        fp8_matmul(x, w.T, 1.0, 1.0, "E4M3", "E4M3")
    hybrid = LayerRecipe(SlotRecipe("E4M3"), SlotRecipe("E4M3"), SlotRecipe("E5M2"), hardware=True)
    check_hardware_recipe(hybrid, "h/0/mlp/c_fc")
    for bad, message in ((hybrid._replace(w=SlotRecipe("E5M2")), r"E5M2 x E5M2 GEMM \(dy.w"),
                         (hybrid._replace(x=SlotRecipe("E5M2"), dy=SlotRecipe("E5M2")), r"x.dy"),
                         (hybrid._replace(x=SlotRecipe(None)), "leaves x in float32"),
                         (hybrid._replace(dy=SlotRecipe("E2M5")), "E2M5 has no FP8")):
        with pytest.raises(ValueError, match=message):
            check_hardware_recipe(bad, "h/0/mlp/c_fc")


CUBLASLT_HLO = """HloModule jit_f, entry_computation_layout={(f8e4m3fn[16,32]{1,0}, f8e4m3fn[16,32]{1,0})->f32[16,16]{1,0}}

ENTRY %main.4 (a.1: f8e4m3fn[16,32], b.1: f8e4m3fn[16,32]) -> f32[16,16] {
  %a.1 = f8e4m3fn[16,32]{1,0} parameter(0)
  %b.1 = f8e4m3fn[16,32]{1,0} parameter(1)
  %c = f32[] constant(1)
  %cublas-gemm.1.0 = (f32[16,16]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[16,32]{1,0} %a.1, f8e4m3fn[16,32]{1,0} %b.1, f32[] %c, f32[] %c), custom_call_target="__cublas$lt$matmul$f8"
  ROOT %get-tuple-element = f32[16,16]{1,0} get-tuple-element((f32[16,16]{1,0}, s8[33554432]{0}) %cublas-gemm.1.0), index=0
}
"""

TRITON_HLO = """HloModule jit_f

%gemm_fusion_dot (p0: f8e4m3fn[64,128], p1: f8e5m2[128,64]) -> f32[64,64] {
  %p0 = f8e4m3fn[64,128]{1,0} parameter(0)
  %p1 = f8e5m2[128,64]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,64]{1,0} dot(f8e4m3fn[64,128]{1,0} %p0, f8e5m2[128,64]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.2 (x: f8e4m3fn[64,128], y: f8e5m2[128,64]) -> f32[64,64] {
  %x = f8e4m3fn[64,128]{1,0} parameter(0)
  %y = f8e5m2[128,64]{1,0} parameter(1)
  ROOT %gemm_fusion_dot.1 = f32[64,64]{1,0} fusion(f8e4m3fn[64,128]{1,0} %x, f8e5m2[128,64]{1,0} %y), kind=kCustom, calls=%gemm_fusion_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":{"block_m":"64"}}}
}
"""


def test_hlo_check_recognises_fp8_gemms_and_fallbacks():
    assert hlo_uses_fp8_gemm(CUBLASLT_HLO) and fp8_gemm_count(CUBLASLT_HLO) == 1
    assert hlo_uses_fp8_gemm(TRITON_HLO) and fp8_gemm_count(TRITON_HLO) == 1
    # Fallback: the fusion upcasts one operand before the dot.
    upcast = TRITON_HLO.replace(
        "  ROOT %dot.1 = f32[64,64]{1,0} dot(f8e4m3fn[64,128]{1,0} %p0,",
        "  %c0 = f16[64,128]{1,0} convert(f8e4m3fn[64,128]{1,0} %p0)\n"
        "  ROOT %dot.1 = f32[64,64]{1,0} dot(f16[64,128]{1,0} %c0,")
    assert "convert" in upcast and not hlo_uses_fp8_gemm(upcast)
    # The same fp8 dot outside any GEMM fusion (as the CPU might keep it) does not count.
    loop_fusion = TRITON_HLO.replace('"__triton_gemm"', '"__ynn_fusion"')
    assert not hlo_uses_fp8_gemm(loop_fusion)
    # Operands named without their types are looked up in the computation.
    untyped = TRITON_HLO.replace("dot(f8e4m3fn[64,128]{1,0} %p0, f8e5m2[128,64]{1,0} %p1)", "dot(%p0, %p1)")
    assert hlo_uses_fp8_gemm(untyped)


def test_on_the_cpu_the_compiled_product_is_not_an_fp8_gemm():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only expectation")
    x, w = _operands(shape=(16, 32), n_out=16)
    compiled = jax.jit(fp8_matmul, static_argnums=(4, 5)).lower(x, w, 1.0, 1.0, "E4M3", "E4M3").compile()
    assert not hlo_uses_fp8_gemm(compiled.as_text())


def _is_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and float(getattr(device, "compute_capability", "0")) >= 9.0


@pytest.mark.skipif(not _is_hopper(), reason="needs a Hopper (sm_90+) GPU")
def test_on_hopper_the_forward_and_both_backward_products_are_fp8_gemms():
    x, w = _operands(shape=(64, 128), n_out=64)
    cotangent = np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32)

    def grads(fmt_x, fmt_w, fmt_dy):
        def loss(x, w):
            return jnp.sum(fp8_matmul(x, w, 0.05, 0.001, fmt_x, fmt_w, fmt_dy, 1e-3) * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()

    assert fp8_gemm_count(grads("E4M3", "E4M3", "E5M2")) >= 3  # y, dx and dw
    assert fp8_gemm_count(grads("E4M3", "E4M3", "E4M3")) >= 3
    forward = jax.jit(lambda x, w: fp8_matmul(x, w, 0.05, 0.001, "E5M2", "E5M2")).lower(x, w).compile().as_text()
    assert not hlo_uses_fp8_gemm(forward)  # E5M2 x E5M2: XLA upcasts
