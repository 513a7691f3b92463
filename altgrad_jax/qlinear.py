"""Linear layer that fake-quantizes its input activation and the gradient flowing back into it.

The weight is NOT quantized here: the train step quantizes every kernel once per step with its
delayed scale (see `scaling.py`) before the parameters are merged into the model, so the layer
receives an already quantized kernel. Activations and input gradients use current scaling:
scale = amax(tensor) * margin / max_finite, computed just in time.

Quantization statistics leave the traced computation without side effects on the jitted
function: forward (activation) counts are written into the `QuantContext.forward_counts` dict of
the trace that called the model and returned by the loss as aux; backward (gradient) counts are
the cotangent of a zero "probe" input of `quantize_gradient`, so `jax.grad` with respect to the
probes returns them. Every count vector is `[n_overflow, n_underflow, n_nonzero, n_elements]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad_jax.fp8_gemm import fp8_matmul
from altgrad_jax.quantize import quantization_counts, quantize
from altgrad_jax.scaling import scale_from_amax

N_COUNTS = 4  # overflow, underflow, nonzero, elements


class LayerQuant(NamedTuple):
    """Quantization settings of one linear layer for one forward/backward pass."""

    act_format: str | None  # None: input activation left in float32
    grad_format: str | None  # None: gradient into the input left in float32
    grad_probe: jax.Array | None  # zeros([N_COUNTS]); its gradient carries the backward counts
    margin: float
    hardware_gemm: bool = False  # real float8 dot (fp8_matmul) instead of the simulated one
    weight_format: str | None = None  # only read by the hardware GEMM (the kernel arrives quantized)
    weight_scale: jax.Array | None = None


@dataclasses.dataclass
class QuantContext:
    """Per-call quantization plan, keyed by layer name (e.g. "h/0/attn/c_attn")."""

    layers: Mapping[str, LayerQuant]
    forward_counts: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


def current_scale(x: jax.Array, fmt, margin: float) -> jax.Array:
    """Just-in-time per-tensor scale; 1.0 when amax is 0 or not finite."""
    return jax.lax.stop_gradient(scale_from_amax(jnp.max(jnp.abs(x)), 1.0, fmt, margin))


def count_vector(x: jax.Array, fmt, scale: jax.Array) -> jax.Array:
    n_overflow, n_underflow, n_nonzero = quantization_counts(x, fmt, scale)
    return jnp.stack([n_overflow, n_underflow, n_nonzero, jnp.float32(x.size)]).astype(jnp.float32)


def quantize_current(x: jax.Array, fmt, margin: float) -> tuple[jax.Array, jax.Array]:
    """(quantize(x) with current scaling and a straight-through gradient, count vector)."""
    scale = current_scale(x, fmt, margin)
    return quantize(x, fmt, scale), jax.lax.stop_gradient(count_vector(x, fmt, scale))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def quantize_gradient(x: jax.Array, probe: jax.Array, fmt: str, margin: float) -> jax.Array:
    """Identity in the forward pass; quantizes the cotangent of `x` in the backward pass.

    The cotangent of `probe` (a zeros([N_COUNTS]) dummy) is the count vector of that
    quantization, so differentiating with respect to the probe reads the counts out.
    """
    del probe, fmt, margin
    return x


def _quantize_gradient_fwd(x, probe, fmt, margin):
    del probe, fmt, margin
    return x, None


def _quantize_gradient_bwd(fmt, margin, _, cotangent):
    scale = current_scale(cotangent, fmt, margin)
    return quantize(cotangent, fmt, scale), count_vector(cotangent, fmt, scale)


quantize_gradient.defvjp(_quantize_gradient_fwd, _quantize_gradient_bwd)


class QLinear(nnx.Module):
    """y = x @ kernel + bias, kernel `[in, out]`, with optional input/gradient quantization."""

    def __init__(
        self, in_features: int, out_features: int, *, layer_name: str, init_std: float, use_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        self.layer_name = layer_name
        self.kernel = nnx.Param(nnx.initializers.normal(init_std)(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None

    def __call__(self, x: jax.Array, quant: QuantContext | None = None) -> jax.Array:
        settings = None if quant is None else quant.layers.get(self.layer_name)
        if settings is not None:
            if settings.grad_format is not None:
                x = quantize_gradient(x, settings.grad_probe, settings.grad_format, settings.margin)
            if settings.hardware_gemm:
                return self._hardware_gemm(x, settings, quant)
            if settings.act_format is not None:
                x, counts = quantize_current(x, settings.act_format, settings.margin)
                quant.forward_counts[self.layer_name] = counts
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def _hardware_gemm(self, x, settings: LayerQuant, quant: QuantContext) -> jax.Array:
        """The same product through float8 operands; fp8_matmul re-casts the already quantized
        kernel exactly (its values are representable at weight_scale)."""
        scale = current_scale(x, settings.act_format, settings.margin)
        quant.forward_counts[self.layer_name] = jax.lax.stop_gradient(count_vector(x, settings.act_format, scale))
        y = fp8_matmul(x, self.kernel[...], scale, settings.weight_scale, settings.act_format, settings.weight_format)
        if self.bias is not None:
            y = y + self.bias[...]
        return y
