"""GPT forward and dropout against independent NumPy computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altgrad_jax.config import TrainConfig
from altgrad_jax.model import GPT, cross_entropy_loss

CONFIG = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=48, batch_size=4)


def _params(config, seed=0):
    _, state = nnx.split(GPT(config, rngs=nnx.Rngs(params=seed)), nnx.Param)
    return nnx.to_pure_dict(state)


def _np_layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_gpt(params, idx, n_head):
    """Reference GPT-2 forward in float64 NumPy, untied head."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    batch, seq = idx.shape
    x = p["wte"]["embedding"][idx] + p["wpe"]["embedding"][:seq][None]
    n_embd = x.shape[-1]
    head_dim = n_embd // n_head
    mask = np.tril(np.ones((seq, seq), bool))
    for i in range(len(p["h"])):
        block = p["h"][i]
        h = _np_layer_norm(x, block["ln_1"])
        qkv = h @ block["attn"]["c_attn"]["kernel"] + block["attn"]["c_attn"]["bias"]
        q, k, v = np.split(qkv, 3, axis=-1)
        heads = lambda t: t.reshape(batch, seq, n_head, head_dim).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        att = np.where(mask, q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim), -np.inf)
        y = (_np_softmax(att) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, n_embd)
        x = x + y @ block["attn"]["c_proj"]["kernel"] + block["attn"]["c_proj"]["bias"]
        h = _np_layer_norm(x, block["ln_2"])
        h = _np_gelu_tanh(h @ block["mlp"]["c_fc"]["kernel"] + block["mlp"]["c_fc"]["bias"])
        x = x + h @ block["mlp"]["c_proj"]["kernel"] + block["mlp"]["c_proj"]["bias"]
    return _np_layer_norm(x, p["ln_f"]) @ p["lm_head"]["kernel"]


def test_parameter_paths_match_the_contract():
    params = _params(CONFIG)
    paths = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    for name in ["wte/embedding", "wpe/embedding", "h/0/ln_1/scale", "h/1/attn/c_attn/kernel",
                 "h/0/attn/c_proj/kernel", "h/0/mlp/c_fc/kernel", "h/1/mlp/c_proj/kernel", "ln_f/scale",
                 "lm_head/kernel"]:
        assert name in paths, name
    assert "lm_head/bias" not in paths
    assert params["lm_head"]["kernel"].shape == (32, 48)  # untied: [n_embd, vocab], its own array
    assert params["h"][0]["attn"]["c_attn"]["kernel"].shape == (32, 96)


def test_forward_matches_numpy_reference():
    params = _params(CONFIG, seed=3)
    # Perturb the zero-initialised biases and unit LayerNorm scales so they are exercised too.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    noise_keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        treedef, [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, noise_keys)]
    )
    idx = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 11)).astype(np.int32)
    graphdef, _ = nnx.split(GPT(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
    logits = nnx.merge(graphdef, params)(jnp.asarray(idx))
    expected = _np_gpt(params, idx, CONFIG.n_head)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-5)

    targets = np.roll(idx, -1, axis=1)
    log_probs = expected - np.log(np.exp(expected - expected.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - expected.max(-1, keepdims=True)
    expected_loss = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    np.testing.assert_allclose(float(cross_entropy_loss(logits, jnp.asarray(targets))), expected_loss, rtol=1e-5)


def test_dropout_is_a_pure_function_of_the_key():
    config = CONFIG.replace(dropout=0.3)
    model = GPT(config, rngs=nnx.Rngs(0))
    idx = jnp.zeros((2, 8), jnp.int32)
    key = jax.random.key(7)
    a, b = model(idx, dropout_key=key), model(idx, dropout_key=key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(model(idx, dropout_key=jax.random.key(8))))
    assert not np.allclose(np.asarray(a), np.asarray(model(idx)))
