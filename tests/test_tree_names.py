"""tree_names: one naming of key paths for metrics, layers and checkpoints."""

import jax
from jax import tree_util

from altgrad_jax.tree_names import join_parts, key_path_name, key_path_parts


def test_every_key_kind_is_named():
    path = (tree_util.DictKey("h"), tree_util.SequenceKey(0), tree_util.GetAttrKey("mu"),
            tree_util.FlattenedIndexKey(3), tree_util.DictKey(7))
    assert key_path_parts(path) == ["h", 0, "mu", 3, "7"]
    assert key_path_name(path) == "h/0/mu/3/7"
    assert join_parts(key_path_parts(path), ".") == "h.0.mu.3.7"


def test_names_of_a_tree():
    tree = {"h": [{"kernel": 1.0, "bias": 2.0}], "lm_head": {"kernel": 3.0}}
    names = [key_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names == ["h/0/bias", "h/0/kernel", "lm_head/kernel"]
    assert key_path_name(()) == ""
