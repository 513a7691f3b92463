"""The quantized layers of one model under one config, and the per-step inputs they receive.

`QuantPlan` is built once per compiled step from the config and the parameter structure. Each
step it turns `TrainState.quant_state` into what every layer's `layer_matmul` needs (the delayed
scales, a zero statistics probe, a rounding key), and turns the probes' gradients (the
statistics, rows x, w, dy) back into the new amax histories.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from altgrad_jax.quant.counts import N_STATS, STATS
from altgrad_jax.quant.hardware import check_hardware_recipe
from altgrad_jax.quant.recipe import LayerRecipe, layer_recipe, linear_layer_paths, path_name
from altgrad_jax.quant.scaling import DELAYED, SLOTS, delayed_scale, push_amax, resolve_scale

_AMAX = STATS.index("amax")


class LayerQuant(NamedTuple):
    """What one linear layer receives for one call: its recipe (static) and this step's arrays."""

    recipe: LayerRecipe
    scales: jax.Array  # float32[3]: given scales of x, w, dy (0 = not known yet, use current)
    probe: jax.Array | None  # zeros [3, 1 + len(recipe.whatif), N_STATS]; its gradient is the statistics
    key: jax.Array | None  # rounding key of this layer (stochastic slots only)
    whatif: tuple | None = None  # (active: bool[], history amax float32[3]) with what-if candidates


class PlannedLayer(NamedTuple):
    path: tuple  # key path in params, e.g. ("h", 0, "mlp", "c_fc")
    name: str  # "h/0/mlp/c_fc"
    recipe: LayerRecipe


def _get(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


class QuantPlan:
    """The layers with at least one quantized slot, in parameter order."""

    def __init__(self, config, abstract_params):
        self.all_layer_paths = linear_layer_paths(abstract_params)
        self.layers = []
        for path in self.all_layer_paths:
            recipe = layer_recipe(config, path_name(path))
            if recipe.hardware:
                check_hardware_recipe(recipe, path_name(path))
            if recipe.quantized:
                self.layers.append(PlannedLayer(path, path_name(path), recipe))

    def zero_probes(self) -> dict[str, jax.Array]:
        return {layer.name: jnp.zeros((3, 1 + len(layer.recipe.whatif), N_STATS), jnp.float32) for layer in self.layers}

    def given_scales(self, layer: PlannedLayer, quant_state) -> jax.Array:
        """float32[3]: each delayed slot's scale from its history (0 while empty); 1 otherwise."""
        entry = _get(quant_state, layer.path)
        return jnp.stack([
            delayed_scale(entry[name]["amax_history"], slot.format, layer.recipe.margin)
            if slot.format is not None and slot.scaling == DELAYED else jnp.float32(1.0)
            for name, slot in zip(SLOTS, layer.recipe.slots())])

    def weight_scale(self, layer: PlannedLayer, quant_state, kernel) -> jax.Array:
        """The scale the w slot uses this step (for metrics that look at the kernel's grid)."""
        slot = layer.recipe.w
        return resolve_scale(slot.scaling, self.given_scales(layer, quant_state)[1], kernel, slot.format,
                             layer.recipe.margin)

    def history_amaxes(self, layer: PlannedLayer, quant_state) -> jax.Array:
        """float32[3]: the largest finite amax each slot's history holds (0 while empty)."""
        entry = _get(quant_state, layer.path)
        return jnp.stack([jnp.max(jnp.where(jnp.isfinite(h), h, 0.0))
                          for h in (entry[name]["amax_history"] for name in SLOTS)])

    def layer_inputs(self, quant_state, rounding_key, probes=None, evaluating: bool = False,
                     whatif_active=None) -> dict[str, LayerQuant]:
        """{layer name: LayerQuant} for one forward pass; `probes` only when statistics are wanted,
        `whatif_active` (a traced bool) to run the what-if candidates this step."""
        inputs = {}
        for index, layer in enumerate(self.layers):
            recipe = layer.recipe.for_eval() if evaluating else layer.recipe
            stochastic = any(slot.rounding == "stochastic" for slot in recipe.slots())
            whatif = None
            if recipe.whatif:
                active = jnp.asarray(False) if whatif_active is None else whatif_active
                whatif = (active, self.history_amaxes(layer, quant_state))
            inputs[layer.name] = LayerQuant(
                recipe, self.given_scales(layer, quant_state), None if probes is None else probes[layer.name],
                jax.random.fold_in(rounding_key, index) if stochastic else None, whatif)
        return inputs

    def updated_state(self, quant_state, stats: dict[str, jax.Array]) -> dict:
        """The histories with this step's amax of every quantized slot pushed (newest first)."""
        new_state = jax.tree_util.tree_map(lambda leaf: leaf, quant_state)  # fresh containers
        for layer in self.layers:
            entry = _get(new_state, layer.path)
            for row, (name, slot) in enumerate(zip(SLOTS, layer.recipe.slots())):
                if slot.format is not None:
                    history = entry[name]["amax_history"]
                    entry[name] = {"amax_history": push_amax(history, stats[layer.name][row, 0, _AMAX])}
        return new_state
