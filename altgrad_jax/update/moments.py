"""Adam moments kept in a narrow dtype between steps: `low_precision_moments(inner, mu, nu)`.

A wrapper around any optax transformation whose state holds `optax.ScaleByAdamState` nodes
(optax.adam, optax.adamw, chains of them): between steps every float leaf of their `mu` and
`nu` is stored as `encoding.Encoded(data, scale)` (bfloat16, an ml_dtypes float8 dtype or uint8
codes, plus a float32 power-of-two scale per tensor, as in FP8-LM), and each update decodes
them to float32, runs the inner update, and encodes the new moments (nearest rounding, scale from
the new moments' amax). So the moments Adam divides by are exactly the decoded stored ones. The
count and every other state leaf stay as they are. `nu` defaults to mu's storage; FP8-LM keeps
the second moment wider (its small values underflow an 8-bit grid, and a v of 0 under a nonzero
m turns m / (sqrt(v) + eps) into m / eps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from altgrad_jax.update.encoding import Encoded, decode, encode
from altgrad_jax.update.storage import Storage, get_storage


def _is_float_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def _map_moments(state, mu_fn, nu_fn):
    """state with mu_fn / nu_fn applied to the mu / nu of every ScaleByAdamState inside it."""

    def one(node):
        if not isinstance(node, optax.ScaleByAdamState):
            return node
        return node._replace(mu=mu_fn(node.mu), nu=nu_fn(node.nu))

    return jax.tree_util.tree_map(one, state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))


def encode_moments(state, mu_storage: Storage, nu_storage: Storage):
    """The inner state with every float mu/nu leaf replaced by its Encoded form."""

    def encoder(storage):
        return lambda tree: jax.tree_util.tree_map(
            lambda x: encode(x, storage) if _is_float_array(x) else x, tree)

    return _map_moments(state, encoder(mu_storage), encoder(nu_storage))


def decode_moments(state, mu_storage: Storage, nu_storage: Storage):
    """The inverse of encode_moments: float32 mu/nu leaves."""

    def decoder(storage):
        return lambda tree: jax.tree_util.tree_map(
            lambda x: decode(x, storage) if isinstance(x, Encoded) else x, tree,
            is_leaf=lambda x: isinstance(x, Encoded))

    return _map_moments(state, decoder(mu_storage), decoder(nu_storage))


def low_precision_moments(inner: optax.GradientTransformation, mu_storage: "str | Storage",
                          nu_storage: "str | Storage | None" = None) -> optax.GradientTransformationExtraArgs:
    """`inner` with its Adam moments stored in mu_storage / nu_storage (see the module note)."""
    inner = optax.with_extra_args_support(inner)
    mu_storage = get_storage(mu_storage)
    nu_storage = mu_storage if nu_storage is None else get_storage(nu_storage)

    def init(params):
        params32 = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params)
        return encode_moments(inner.init(params32), mu_storage, nu_storage)

    def update(updates, state, params=None, **extra_args):
        inner_state = decode_moments(state, mu_storage, nu_storage)
        updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
        return updates, encode_moments(inner_state, mu_storage, nu_storage)

    return optax.GradientTransformationExtraArgs(init, update)
