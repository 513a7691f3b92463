"""The quantization recipe of every linear layer: per operand slot (x, w, dy) a format, a scaling
and a rounding, resolved once from the config's defaults and its ordered layer rules.

Resolution for a layer named like `h/0/mlp/c_fc` (first step wins at each level):
1. defaults: x and w take `fp8_forward_format`, dy takes `fp8_backward_format`, both falling back
   to `fp8_format`; scaling and rounding come from `fp8_scaling` / `fp8_rounding` (one value, or
   one per slot);
2. the first of `fp8_layer_rules` whose `match` glob matches the name overrides the slots it
   names; then, for configs that use it, the first match of `fp8_layer_formats` sets all three
   formats ("FP32" keeps the layer in float32);
3. `quantize_activations: false` turns the x slot off and `quantize_gradients: false` the dy
   slot, everywhere; `use_fp8: false` turns every slot off.
"""

from __future__ import annotations

import fnmatch
from typing import NamedTuple

import jax

from altgrad_jax.quant.rounding import NEAREST
from altgrad_jax.quant.scaling import SLOTS
from altgrad_jax.tree_names import join_parts

UNQUANTIZED = "FP32"


class SlotRecipe(NamedTuple):
    format: str | None  # a FORMATS name; None leaves the operand in float32
    scaling: str = "delayed"  # delayed, current or none (see scaling.py)
    rounding: str = NEAREST  # nearest or stochastic


class LayerRecipe(NamedTuple):
    """What one quantized matmul does with its three operands; hashable, so it can be static."""

    x: SlotRecipe
    w: SlotRecipe
    dy: SlotRecipe
    margin: float = 1.0  # scale = amax * margin / max_finite
    hardware: bool = False  # real float8 GEMMs (see hardware.py) instead of float32 ones
    whatif: tuple[str, ...] = ()  # what-if candidates (whatif.py); () = off

    @property
    def quantized(self) -> bool:
        return any(slot.format is not None for slot in self.slots())

    def slots(self) -> tuple[SlotRecipe, SlotRecipe, SlotRecipe]:
        return (self.x, self.w, self.dy)

    def for_eval(self) -> "LayerRecipe":
        """Evaluation rounds to nearest: stochastic rounding is a training device."""
        return self._replace(**{name: slot._replace(rounding=NEAREST) for name, slot in zip(SLOTS, self.slots())})


def per_slot(value) -> dict[str, str]:
    """A config value given once for all slots, or as {x: .., w: .., dy: ..}, as a slot dict."""
    if isinstance(value, dict):
        return dict(value)
    return {slot: value for slot in SLOTS}


def _first_match(rules, layer_name: str):
    return next((rule for rule in rules if fnmatch.fnmatchcase(layer_name, rule["match"])), None)


def _format_or_none(name: str | None) -> str | None:
    return None if name in (None, UNQUANTIZED) else name


def layer_recipe(config, layer_name: str) -> LayerRecipe:
    """The recipe of one layer under `config` (see the module docstring for the order)."""
    forward = config.fp8_forward_format or config.fp8_format
    formats = {"x": forward, "w": forward, "dy": config.fp8_backward_format or config.fp8_format}
    scaling, rounding = per_slot(config.fp8_scaling), per_slot(config.fp8_rounding)
    rule = _first_match(config.fp8_layer_rules, layer_name)
    if rule is not None:
        formats.update({slot: rule[slot] for slot in SLOTS if slot in rule})
        scaling.update(rule.get("scaling", {}))
        rounding.update(rule.get("rounding", {}))
    else:
        legacy = next((fmt for pattern, fmt in config.fp8_layer_formats.items()
                       if fnmatch.fnmatchcase(layer_name, pattern)), None)
        if legacy is not None:
            formats = dict.fromkeys(SLOTS, legacy)
    if not config.use_fp8:
        formats = dict.fromkeys(SLOTS)
    if not config.quantize_activations:
        formats["x"] = None
    if not config.quantize_gradients:
        formats["dy"] = None
    slots = {slot: SlotRecipe(_format_or_none(formats[slot]), scaling[slot], rounding[slot]) for slot in SLOTS}
    return LayerRecipe(**slots, margin=config.fp8_amax_margin,
                       hardware=bool(config.use_fp8 and config.fp8_hardware_gemm),
                       whatif=tuple(config.whatif_formats) if config.whatif_interval > 0 else ())


def linear_layer_paths(params) -> list[tuple]:
    """Key paths of every dict in `params` that holds a `kernel` (the linear layers), in tree order."""
    paths = []
    for key_path, _ in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(k.key for k in key_path)
        if keys[-1] == "kernel":
            paths.append(keys[:-1])
    return paths


def path_name(path: tuple) -> str:
    """A layer's name from its key path: `h/0/mlp/c_fc`, as metric names spell it."""
    return join_parts(path)
