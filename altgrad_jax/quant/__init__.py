"""The FP8 recipe: formats, rounding, scaling, the three-slot quantized matmul and the layer rules.

formats.py   the 8-bit formats by bit layout          rounding.py  nearest / stochastic rounding
counts.py    overflow, underflow, relative error      scaling.py   delayed / current / none scales
recipe.py    per-layer slot recipes from the config   matmul.py    quantized_matmul, layer_matmul
plan.py      a model's quantized layers per step      metrics.py   quant/* metrics from the stats
hardware.py  float8 GEMM constraints, HLO check
"""

from altgrad_jax.quant.formats import FORMATS, FloatFormat, get_format
from altgrad_jax.quant.matmul import layer_matmul, quantized_matmul
from altgrad_jax.quant.recipe import LayerRecipe, SlotRecipe, layer_recipe
from altgrad_jax.quant.rounding import quantize, round_to_format
from altgrad_jax.quant.counts import quantization_counts, tensor_stats

__all__ = ["FORMATS", "FloatFormat", "LayerRecipe", "SlotRecipe", "get_format", "layer_matmul", "layer_recipe",
           "quantization_counts", "quantize", "quantized_matmul", "round_to_format", "tensor_stats"]
