"""Real FP8 matrix products for Hopper-class GPUs (config `fp8_hardware_gemm`), and a check that one ran.

`fp8_matmul(x, w, x_scale, w_scale, fmt_x, fmt_w)` computes the same product as the simulated
path, `quantize(x, fmt_x, x_scale) @ quantize(w, fmt_w, w_scale)`, but with float8 operands:
x * (1/x_scale) and w * (1/w_scale) are clipped to the format's max finite value (the float8
casts overflow to inf/NaN instead of saturating) and cast to float8, multiplied with float32
accumulation (`preferred_element_type=float32`), and the product is multiplied by
x_scale * w_scale. On an H100/H200 XLA rewrites that pattern into one cuBLASLt FP8 GEMM with the
scales fused (custom call `__cublas$lt$matmul$f8`); on the CPU it runs as an ordinary dot of the
upcast values and gives the same numbers (tests/test_fp8_gemm.py).

cuBLASLt constraints that make XLA fall back silently to an upcast GEMM (check with
`hlo_uses_fp8_gemm` on the compiled text): at least one operand must be E4M3 (float8_e4m3fn);
E5M2 x E5M2 is refused. Only E4M3 and E5M2 have FP8 tensor-core support; the other formats
raise here. Operands are flattened to 2-D ([rows, K] @ [K, N]) because the rewrite needs exactly
one contracting and one non-contracting dimension.

The gradient is straight-through like `quantize`'s: dx = g @ (w8 * w_scale)^T and
dw = (x8 * x_scale)^T @ g in float32, from the float8 operands kept as residuals, which equals the
gradient of the simulated path; the scales get none. (An FP8 backward GEMM would also quantize g,
which the simulated model does not do at that point.)
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from altgrad_jax.formats import get_format

# Formats with FP8 tensor-core GEMMs on Hopper, and their JAX dtypes.
HARDWARE_DTYPES = {"E4M3": jnp.float8_e4m3fn, "E5M2": jnp.float8_e5m2}
CUBLASLT_FP8_TARGET = "__cublas$lt$matmul$f8"
_FP8_TYPE = r"f8e(?:4m3fn|5m2)"


def hardware_dtype(fmt) -> jnp.dtype:
    """The float8 dtype of `fmt` (a name or FloatFormat); ValueError for formats without FP8 GEMMs."""
    name = get_format(fmt).name
    if name not in HARDWARE_DTYPES:
        raise ValueError(f"fp8_hardware_gemm: format {name} has no FP8 tensor-core GEMM; "
                         f"use one of {sorted(HARDWARE_DTYPES)} (or fp8_hardware_gemm=false)")
    return HARDWARE_DTYPES[name]


def check_hardware_pair(fmt_x, fmt_w) -> None:
    """cuBLASLt needs at least one E4M3 operand; refuse E5M2 x E5M2 instead of falling back silently."""
    if get_format(fmt_x).name == get_format(fmt_w).name == "E5M2":
        raise ValueError("fp8_hardware_gemm: cuBLASLt has no E5M2 x E5M2 GEMM (XLA would silently upcast); "
                         "use E4M3 for weights or activations, e.g. fp8_forward_format=E4M3")


def to_fp8(x: jax.Array, fmt, scale) -> jax.Array:
    """x * (1/scale), clipped to +-max_finite, cast to the float8 dtype of `fmt` (NaN stays NaN)."""
    dtype = hardware_dtype(fmt)
    limit = np.float32(get_format(fmt).max_finite)
    inverse = jnp.float32(1.0) / jnp.asarray(scale, jnp.float32)
    return jnp.clip(x.astype(jnp.float32) * inverse, -limit, limit).astype(dtype)


def _dot_2d(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _forward(x, w, x_scale, w_scale, fmt_x, fmt_w):
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_matmul needs x [..., K] and w [K, N], got {x.shape} and {w.shape}")
    x_scale, w_scale = jnp.asarray(x_scale, jnp.float32), jnp.asarray(w_scale, jnp.float32)
    x8 = to_fp8(x.reshape(-1, x.shape[-1]), fmt_x, x_scale)
    w8 = to_fp8(w, fmt_w, w_scale)
    y = _dot_2d(x8, w8) * (x_scale * w_scale)
    return y.reshape(*x.shape[:-1], w.shape[1]), (x8, w8, x_scale, w_scale)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fp8_matmul(x: jax.Array, w: jax.Array, x_scale, w_scale, fmt_x="E4M3", fmt_w="E4M3") -> jax.Array:
    """float32 `quantize(x, fmt_x, x_scale) @ quantize(w, fmt_w, w_scale)` through float8 operands.

    x: [..., K] float32; w: [K, N] float32; scales: positive float32 scalars; formats static
    ("E4M3" or "E5M2"). Straight-through gradient for x and w, none for the scales.
    """
    return _forward(x, w, x_scale, w_scale, fmt_x, fmt_w)[0]


def _fp8_matmul_fwd(x, w, x_scale, w_scale, fmt_x, fmt_w):
    y, residuals = _forward(x, w, x_scale, w_scale, fmt_x, fmt_w)
    return y, (residuals, x.shape)


def _fp8_matmul_bwd(fmt_x, fmt_w, saved, g):
    del fmt_x, fmt_w
    (x8, w8, x_scale, w_scale), x_shape = saved
    g2 = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
    x_q = x8.astype(jnp.float32) * x_scale
    w_q = w8.astype(jnp.float32) * w_scale
    dx = _dot_2d(g2, w_q.T).reshape(x_shape)
    dw = _dot_2d(x_q.T, g2)
    return dx, dw, jnp.zeros_like(x_scale), jnp.zeros_like(w_scale)


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def hlo_uses_fp8_gemm(compiled_text: str) -> bool:
    """True when compiled (optimized) HLO text runs a GEMM on float8 operands on the GPU.

    Recognises the cuBLASLt FP8 custom call, and a GEMM fusion (Triton, or cuDNN) whose dot takes
    two float8 operands: XLA's autotuner may pick Triton over cuBLASLt. A dot outside such a
    fusion does not count, and neither does a fusion that converts its float8 inputs to a wider
    type before the dot (XLA's silent fallback; on the CPU the operands are always upcast).
    Pass `jax.jit(f).lower(...).compile().as_text()`.
    """
    if CUBLASLT_FP8_TARGET in compiled_text:
        return True
    computations = _computations(compiled_text)
    pending = [callee for body in computations.values() for line in body
               if _GEMM_FUSION_KIND.search(line) for callee in _CALLS.findall(line)]
    seen = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        body = computations[name]
        if _has_fp8_dot(body):
            return True
        pending.extend(callee for line in body for callee in _CALLS.findall(line))  # nested fusions
    return False


_GEMM_FUSION_KIND = re.compile(r"fusion\(.*(?:__triton\w*gemm|__cudnn\$fusion)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([^\s(]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")


def _computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    computations, current = {}, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("{")[0]:
            current = computations.setdefault(header.group(1), [])
        elif line.strip() == "}":
            current = None
        elif current is not None:
            current.append(line)
    return computations


def _has_fp8_dot(body: list[str]) -> bool:
    types, dots = {}, []
    for line in body:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, result_type, opcode, rest = match.groups()
        types[name] = result_type
        if opcode == "dot":
            dots.append(rest)
    for rest in dots:
        # Drop shapes and layouts so that the commas left separate the operands.
        operands = re.sub(r"\[[^\]]*\]|\{[^}]*\}", "", rest.split(")")[0]).split(",")
        operand_types = []
        for operand in operands:
            tokens = operand.split()
            operand_types.append(tokens[0] if len(tokens) > 1 else types.get(tokens[0].lstrip("%"), "") if tokens else "")
        if len(operand_types) == 2 and all(re.match(_FP8_TYPE, t) for t in operand_types):
            return True
    return False
