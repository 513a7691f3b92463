"""The params as the train state holds them under `master_weights`, and back to float32.

float32: the arrays themselves. bfloat16: jnp.bfloat16 arrays. A format: one `Encoded(data,
scale)` per leaf (ml_dtypes float8 or uint8 codes plus a power-of-two float32 scale), so a
checkpoint holds the bytes the run trained from. The model and the optimizer always see the
float32 values (`to_float32`); values already on the grid encode exactly (`to_state`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from altgrad_jax.update.encoding import Encoded, decode, encode
from altgrad_jax.update.storage import get_storage, store_tree


def _is_encoded(node) -> bool:
    return isinstance(node, Encoded)


def to_state(params32, master_weights: str):
    """float32 values on the master_weights grid -> the state's form (see the module note)."""
    storage = get_storage(master_weights)
    if storage.format is None:
        return jax.tree_util.tree_map(lambda p: p.astype(storage.dtype), params32)
    return jax.tree_util.tree_map(lambda p: encode(p, storage), params32)


def to_float32(stored, master_weights: str):
    """The state's params as float32 values."""
    storage = get_storage(master_weights)
    if storage.format is None:
        return jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), stored)
    return jax.tree_util.tree_map(lambda e: decode(e, storage), stored, is_leaf=_is_encoded)


def initial_state_params(params32, master_weights: str):
    """Freshly initialised float32 params rounded (to nearest) onto the grid, in the state's form."""
    return to_state(store_tree(params32, master_weights), master_weights)
