"""The training state pytree and its deterministic initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from altgrad_jax.model import GPT
from altgrad_jax.optimizer import make_optimizer
from altgrad_jax.quant.recipe import linear_layer_paths
from altgrad_jax.quant.scaling import init_quant_state
from altgrad_jax.update.master import initial_state_params, to_float32


@struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    step: int32 scalar, the number of steps taken.
    params: plain nested dict (`nnx.to_pure_dict` of the GPT's nnx.Param state; block indices are
        int keys: params["h"][0]["attn"]["c_attn"]["kernel"]) of float32 arrays, or as stored
        under a narrow `master_weights` (update/master.py: bfloat16 arrays or Encoded codes).
    opt_state: optax state of `make_optimizer(config)`.
    quant_state: per linear layer and operand slot x, w, dy an "amax_history" (quant/scaling.py);
        overwritten by the step, never optimized.
    key: typed PRNG key (`jax.random.key`); dropout uses fold_in(key, step).
    """

    step: jax.Array
    params: dict
    opt_state: object
    quant_state: dict
    key: jax.Array


def model_structure(config) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params as a pure dict of ShapeDtypeStructs) for `config`, allocating nothing."""
    abstract_model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def init_params(config, key: jax.Array) -> dict:
    model = GPT(config, rngs=nnx.Rngs(params=key))
    _, params = nnx.split(model, nnx.Param)
    return nnx.to_pure_dict(params)


def init_train_state(config) -> TrainState:
    """Same config, bitwise the same state: everything derives from `jax.random.key(config.seed)`."""
    param_key, train_key = jax.random.split(jax.random.key(config.seed))
    params32 = init_params(config, param_key)
    params = initial_state_params(params32, config.master_weights)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(config).init(to_float32(params, config.master_weights)),
        quant_state=init_quant_state(linear_layer_paths(params32), config.amax_history_len),
        key=train_key,
    )


def abstract_train_state(config) -> TrainState:
    """Shapes and dtypes of `init_train_state(config)` without computing it (restore target)."""
    return jax.eval_shape(lambda: init_train_state(config))
