"""GPT forward, gradient quantizer and delayed scaling against independent NumPy computations."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from altgrad_jax.config import TrainConfig
from altgrad_jax.formats import get_format
from altgrad_jax.model import GPT, cross_entropy_loss
from altgrad_jax.qlinear import quantize_gradient
from altgrad_jax.scaling import init_quant_state, scale_from_history, update_scaling_entry

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


def test_gradient_quantizer_quantizes_the_cotangent_and_reports_counts():
    fmt = get_format("E5M2")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64,)).astype(np.float32))
    cotangent = rng.normal(size=(64,)).astype(np.float32) * np.logspace(-12, 0, 64).astype(np.float32)
    cotangent[5] = 0.0
    margin = 1.05
    probe = jnp.zeros((4,), jnp.float32)
    dx, dprobe = jax.grad(
        lambda x, p: jnp.sum(quantize_gradient(x, p, "E5M2", margin) * cotangent), argnums=(0, 1)
    )(x, probe)

    scale = np.float32(np.abs(cotangent).max() * np.float32(margin) / np.float32(fmt.max_finite))
    q = (cotangent / scale).astype(ml_dtypes.float8_e5m2).astype(np.float32)
    np.testing.assert_allclose(np.asarray(dx), q * scale, rtol=1e-6)
    underflow = np.sum((cotangent != 0) & (q == 0))
    assert underflow > 0  # the 1e-12 end of the range is below E5M2's 2^-16 * scale
    np.testing.assert_array_equal(np.asarray(dprobe), [0, underflow, 63, 64])
    # Forward is the identity.
    np.testing.assert_array_equal(np.asarray(quantize_gradient(x, probe, "E5M2", margin)), np.asarray(x))


def test_scale_from_history_uses_the_max_and_guards_zero_and_nonfinite():
    fmt = get_format("E4M3")
    history = jnp.asarray([1.0, 3.0, 2.0], jnp.float32)
    assert float(scale_from_history(history, jnp.float32(9.0), fmt, 1.05)) == pytest.approx(3.0 * 1.05 / 448)
    for bad in ([0.0, 0.0, 0.0], [np.nan, 0.0, 0.0], [np.inf, np.nan, 0.0]):
        assert float(scale_from_history(jnp.asarray(bad, jnp.float32), jnp.float32(9.0), fmt, 1.05)) == 9.0
    # A non-finite entry does not hide the finite ones.
    assert float(scale_from_history(jnp.asarray([np.nan, 2.0], jnp.float32), jnp.float32(9.0), fmt, 1.0)) \
        == pytest.approx(2.0 / 448)


def test_update_pushes_newest_first_and_keeps_previous_scale_on_nan():
    fmt = get_format("E5M2")
    entry = {"amax_history": jnp.zeros((3,), jnp.float32), "scale": jnp.float32(0.5)}
    entry = update_scaling_entry(entry, jnp.float32(2.0), fmt, 1.0)
    entry = update_scaling_entry(entry, jnp.float32(4.0), fmt, 1.0)
    np.testing.assert_array_equal(np.asarray(entry["amax_history"]), [4.0, 2.0, 0.0])
    assert float(entry["scale"]) == pytest.approx(4.0 / fmt.max_finite)
    for amax in (1.0, 1.0, 1.0):  # 4.0 drops out of a 3-long history after three more pushes
        entry = update_scaling_entry(entry, jnp.float32(amax), fmt, 1.0)
    assert float(entry["scale"]) == pytest.approx(1.0 / fmt.max_finite)
    nan_entry = update_scaling_entry(
        {"amax_history": jnp.zeros((3,), jnp.float32), "scale": jnp.float32(0.5)}, jnp.float32(np.nan), fmt, 1.0
    )
    assert float(nan_entry["scale"]) == 0.5


def test_quant_state_has_one_entry_per_linear_layer_whatever_the_config():
    params = _params(CONFIG)
    plain = init_quant_state(params, CONFIG)
    fp8 = init_quant_state(params, CONFIG.replace(use_fp8=True, fp8_format="E4M3", fp8_layer_formats={"lm_head": "FP32"}))
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(fp8)
    assert set(fp8) == {"h", "lm_head"}
    assert float(fp8["lm_head"]["scale"]) == 1.0  # kept in float32 by the override
    kernel = np.asarray(params["h"][1]["mlp"]["c_fc"]["kernel"])
    expected = np.abs(kernel).max() * 1.05 / 448
    assert float(fp8["h"][1]["mlp"]["c_fc"]["scale"]) == pytest.approx(expected, rel=1e-6)
    assert float(plain["h"][1]["mlp"]["c_fc"]["scale"]) == 1.0
