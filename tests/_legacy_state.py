"""The state written into tests/data/checkpoint_v1 (see tests/data/README.md): built from NumPy
values alone, so the test recomputes it bit for bit, with every container and key kind the train
state uses (dataclass attributes, int and str dict keys, optax tuples and namedtuples, a typed key)
and the dtypes stored as other types (bfloat16, float8)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class LegacyState:
    step: jax.Array
    params: dict
    opt_state: tuple
    quant_state: dict
    key: jax.Array


def legacy_state(step: int) -> LegacyState:
    rng = np.random.default_rng(step)

    def normal(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32), dtype)

    params = {
        "h": {0: {"mlp": {"c_fc": {"kernel": normal(4, 8), "bias": normal(8)}}}},
        "lm_head": {"kernel": normal(8, 16, dtype=jnp.bfloat16)},
    }
    mu = jax.tree.map(lambda p: normal(*p.shape), params)
    nu = jax.tree.map(lambda p: jnp.abs(normal(*p.shape)), params)
    opt_state = (optax.EmptyState(), (optax.ScaleByAdamState(jnp.int32(step), mu, nu), optax.EmptyState()))
    quant_state = {"h/0/mlp/c_fc": {"w": {"amax_history": jnp.abs(normal(4))},
                                    "codes": normal(6, dtype=jnp.float8_e4m3fn)}}
    return LegacyState(jnp.int32(step), params, opt_state, quant_state, jax.random.key(step))
