"""Real FP8 GEMMs for Hopper-class GPUs (config `fp8_hardware_gemm`), and a check that one ran.

With `LayerRecipe.hardware`, `layer_matmul` casts each operand's grid values (already clipped
and rounded, so the cast is exact) to its float8 dtype, runs the three products with float32
accumulation (`preferred_element_type=float32`) and multiplies the results by the two operand
scales. On an H100/H200 XLA rewrites that pattern into a cuBLASLt FP8 GEMM with the scales fused
(custom call `__cublas$lt$matmul$f8`); on the CPU it runs as an ordinary dot of the upcast values.

cuBLASLt constraints that make XLA fall back silently to an upcast GEMM (check with
`hlo_uses_fp8_gemm` on the compiled text): only E4M3 and E5M2 have FP8 tensor-core GEMMs, and at
least one operand of each product must be E4M3 (E5M2 x E5M2 is refused), so the three pairs
x.w, dy.w and x.dy are checked when the step is built (`check_hardware_recipe`).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from altgrad_jax.quant.formats import get_format

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


def check_hardware_recipe(recipe, layer_name: str) -> None:
    """Refuse a recipe that the FP8 GEMMs cannot run as written (XLA would upcast silently)."""
    formats = {"x": recipe.x.format, "w": recipe.w.format, "dy": recipe.dy.format}
    if all(fmt is None for fmt in formats.values()):
        return
    missing = [slot for slot, fmt in formats.items() if fmt is None]
    if missing:
        raise ValueError(f"fp8_hardware_gemm: layer {layer_name} leaves {', '.join(missing)} in float32; "
                         "the FP8 GEMMs need all three operands quantized")
    for slot, fmt in formats.items():
        try:
            hardware_dtype(fmt)
        except ValueError as error:
            raise ValueError(f"{error} (layer {layer_name}, slot {slot})") from None
    for a, b in (("x", "w"), ("dy", "w"), ("x", "dy")):
        if get_format(formats[a]).name == get_format(formats[b]).name == "E5M2":
            raise ValueError(f"fp8_hardware_gemm: cuBLASLt has no E5M2 x E5M2 GEMM ({a}.{b} in layer {layer_name}; "
                             "XLA would silently upcast); use E4M3 for the forward, e.g. fp8_forward_format=E4M3")


def fp8_gemm_count(compiled_text: str) -> int:
    """How many GEMMs on float8 operands compiled (optimized) GPU HLO text runs.

    Counts cuBLASLt FP8 custom calls, and GEMM fusions (Triton, or cuDNN) whose dot takes two
    float8 operands: XLA's autotuner may pick Triton over cuBLASLt. A dot outside such a fusion
    does not count, and neither does a fusion that converts its float8 inputs to a wider type
    before the dot (XLA's silent fallback; on the CPU the operands are always upcast).
    Pass `jax.jit(f).lower(...).compile().as_text()`.
    """
    count = sum(1 for line in compiled_text.splitlines() if CUBLASLT_FP8_TARGET in line and "custom-call" in line)
    computations = _computations(compiled_text)
    for body in computations.values():
        for line in body:
            if _GEMM_FUSION_KIND.search(line) and any(_calls_fp8_dot(callee, computations, set())
                                                      for callee in _CALLS.findall(line)):
                count += 1
    return count


def hlo_uses_fp8_gemm(compiled_text: str) -> bool:
    """True when compiled HLO text runs at least one GEMM on float8 operands (fp8_gemm_count)."""
    return fp8_gemm_count(compiled_text) > 0


def _calls_fp8_dot(name: str, computations: dict[str, list[str]], seen: set) -> bool:
    if name in seen or name not in computations:
        return False
    seen.add(name)
    body = computations[name]
    return _has_fp8_dot(body) or any(_calls_fp8_dot(callee, computations, seen)
                                     for line in body for callee in _CALLS.findall(line))


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
