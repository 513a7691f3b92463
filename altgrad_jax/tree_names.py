"""Names for pytree key paths: the one place that turns a key path into a name.

Metric names (`grad_norm_l2/h/0/attn/c_attn/kernel`), layer names (`h/0/mlp/c_fc`) and the
checkpoint's leaf descriptions all come from here, so a leaf is called the same everywhere.
"""

from jax import tree_util


def key_path_parts(key_path) -> list:
    """One part per key: dict keys as strings, sequence positions and flattened indices as they
    are (ints), attribute names; anything else as its `str`. JSON-ready."""
    parts = []
    for key in key_path:
        if isinstance(key, tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, tree_util.SequenceKey):
            parts.append(key.idx)
        elif isinstance(key, tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, tree_util.FlattenedIndexKey):
            parts.append(key.key)
        else:
            parts.append(str(key))
    return parts


def join_parts(parts, separator: str = "/") -> str:
    """Parts joined with `separator` ("/" for names, "." for checkpoint tensor names)."""
    return separator.join(str(part) for part in parts)


def key_path_name(key_path) -> str:
    """A key path joined with "/": `h/0/attn/c_attn/kernel`."""
    return join_parts(key_path_parts(key_path))
