"""nanoGPT-style decoder in Flax NNX with fake-quantized linear layers.

Token + position embeddings, `n_layer` pre-LayerNorm blocks (causal self-attention, GELU MLP),
a final LayerNorm and an UNTIED output head (`lm_head/kernel` is its own parameter, not the
transpose of `wte/embedding`). Every linear layer is a `QLinear` that quantizes the three
operands of its matmul (`altgrad_jax.quant.layer_matmul`) when the forward call receives the
step's per-layer quantization inputs; without them the model is plain float32.

Parameter paths (the pure-dict state of `nnx.split(model, nnx.Param)`):
`wte/embedding`, `wpe/embedding`, `h/<i>/ln_1/{scale,bias}`, `h/<i>/attn/c_attn/{kernel,bias}`,
`h/<i>/attn/c_proj/{kernel,bias}`, `h/<i>/ln_2/{scale,bias}`, `h/<i>/mlp/c_fc/{kernel,bias}`,
`h/<i>/mlp/c_proj/{kernel,bias}`, `ln_f/{scale,bias}`, `lm_head/kernel` (no bias). `<i>` is an
int key in the pure dict. Kernels are `[in_features, out_features]`.

Dropout is a pure function of an explicit key passed to `__call__` (`dropout_key=None` means no
dropout), so the model holds no RNG state and `nnx.split(model, nnx.Param)` is its whole state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad_jax.quant.matmul import layer_matmul
from altgrad_jax.quant.plan import LayerQuant

INIT_STD = 0.02
LAYER_NORM_EPS = 1e-5


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _site_key(key: jax.Array | None, site: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, site)


@jax.custom_vjp
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """LayerNorm over the last axis; the forward is flax's (`nnx.LayerNorm`, fast variance) op
    for op. The backward is the closed form (as PyTorch's), two row reductions instead of the
    dozen ops autodiff emits: 2-4 % of the whole plain step on XLA:CPU (issue 14)."""
    return _layer_norm_forward(x, scale, bias)[0]


def _layer_norm_forward(x, scale, bias):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean)
    rstd = jax.lax.rsqrt(var + LAYER_NORM_EPS)
    centred = x - mean
    return centred * (rstd * scale) + bias, (centred * rstd, rstd, scale)


def _layer_norm_backward(residuals, dy):
    normalized, rstd, scale = residuals
    g = dy * scale
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
                 - normalized * jnp.mean(g * normalized, axis=-1, keepdims=True))
    batch_axes = tuple(range(dy.ndim - 1))
    return dx, jnp.sum(dy * normalized, axis=batch_axes), jnp.sum(dy, axis=batch_axes)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nnx.Module):
    """`scale` and `bias` as `nnx.LayerNorm` names, initialises and draws them (one key each, so
    the rest of the model's init is unchanged), computed by `layer_norm`."""

    def __init__(self, n_features: int, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(nnx.initializers.ones(rngs.params(), (n_features,), jnp.float32))
        self.bias = nnx.Param(nnx.initializers.zeros(rngs.params(), (n_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...])


def _layer_norm(n_embd: int, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(n_embd, rngs=rngs)


@jax.custom_vjp
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, weight_dropout: jax.Array) -> jax.Array:
    """softmax(causal(q k^T)) * weight_dropout, times v; q, k, v `[batch, head, seq, head_dim]`,
    q already scaled by 1/sqrt(head_dim), weight_dropout 1 or the `[batch, head, seq, seq]` mask
    already divided by the keep rate. The backward is written out: the masked entries need no
    select (their weights are 0) and no [seq, seq] tensor is broadcast or stored beyond the
    probabilities. On XLA:CPU the whole plain step got about 5 % (small) and 9 % (medium) faster
    than with autodiff's backward, in in-process A/B rounds against PyTorch (issue 14)."""
    return _causal_attention_forward(q, k, v, weight_dropout)[0]


def _causal_attention_forward(q, k, v, weight_dropout):
    seq = q.shape[2]
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k)
    scores = jnp.where(jnp.tril(jnp.ones((seq, seq), dtype=bool)), scores, -jnp.inf)
    exp = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    probs = exp / jnp.sum(exp, axis=-1, keepdims=True)
    out = jnp.einsum("bhts,bhsd->bhtd", probs * weight_dropout, v)
    return out, (q, k, v, probs, weight_dropout)


def _causal_attention_backward(residuals, d_out):
    q, k, v, probs, weight_dropout = residuals
    d_v = jnp.einsum("bhts,bhtd->bhsd", probs * weight_dropout, d_out)
    # out = (probs * dropout) v; the softmax's Jacobian applied to d_probs. Its row term is summed
    # over the [seq, seq] product as autodiff does, not as FlashAttention's rowsum(d_out * out):
    # equal in exact arithmetic, but only this one is exactly 0 where the true gradient is (a row
    # with a single unmasked entry), and dy's underflow count must not see rounding residue.
    d_probs = jnp.einsum("bhtd,bhsd->bhts", d_out, v) * weight_dropout
    d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
    d_q = jnp.einsum("bhts,bhsd->bhtd", d_scores, k)
    d_k = jnp.einsum("bhts,bhtd->bhsd", d_scores, q)
    return d_q, d_k, d_v, jnp.zeros_like(weight_dropout)


causal_attention.defvjp(_causal_attention_forward, _causal_attention_backward)


class QLinear(nnx.Module):
    """y = x @ kernel + bias, kernel `[in, out]`; quantized when `quant` holds this layer's name."""

    def __init__(self, in_features: int, out_features: int, *, layer_name: str, init_std: float,
                 use_bias: bool = True, rngs: nnx.Rngs):
        self.layer_name = layer_name
        self.kernel = nnx.Param(nnx.initializers.normal(init_std)(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None

    def __call__(self, x: jax.Array, quant: Mapping[str, LayerQuant] | None = None) -> jax.Array:
        layer = None if quant is None else quant.get(self.layer_name)
        if layer is None:
            y = x @ self.kernel[...]
        else:
            y = layer_matmul(x, self.kernel[...], layer.recipe, layer.scales, layer.probe, layer.key, layer.whatif)
        return y if self.bias is None else y + self.bias[...]


class CausalSelfAttention(nnx.Module):
    def __init__(self, config, prefix: str, *, rngs: nnx.Rngs):
        n_embd = config.n_embd
        self.n_head = config.n_head
        self.dropout_rate = config.dropout
        # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 n_layer).
        proj_std = INIT_STD / math.sqrt(2 * config.n_layer)
        self.c_attn = QLinear(n_embd, 3 * n_embd, layer_name=f"{prefix}/c_attn", init_std=INIT_STD, rngs=rngs)
        self.c_proj = QLinear(n_embd, n_embd, layer_name=f"{prefix}/c_proj", init_std=proj_std, rngs=rngs)

    def __call__(self, x, *, dropout_key=None, quant: Mapping[str, LayerQuant] | None = None):
        batch, seq, n_embd = x.shape
        head_dim = n_embd // self.n_head
        qkv = self.c_attn(x, quant).reshape(batch, seq, 3, self.n_head, head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each [batch, head, seq, head_dim]
        weight_dropout = jnp.ones((), x.dtype)  # no dropout
        if dropout_key is not None and self.dropout_rate > 0.0:
            weight_dropout = dropout(jnp.ones((batch, self.n_head, seq, seq), x.dtype), self.dropout_rate,
                                     _site_key(dropout_key, 0))
        y = causal_attention(q / math.sqrt(head_dim), k, v, weight_dropout)
        y = y.transpose(0, 2, 1, 3).reshape(batch, seq, n_embd)
        return dropout(self.c_proj(y, quant), self.dropout_rate, _site_key(dropout_key, 1))


class MLP(nnx.Module):
    def __init__(self, config, prefix: str, *, rngs: nnx.Rngs):
        n_embd = config.n_embd
        self.dropout_rate = config.dropout
        proj_std = INIT_STD / math.sqrt(2 * config.n_layer)
        self.c_fc = QLinear(n_embd, 4 * n_embd, layer_name=f"{prefix}/c_fc", init_std=INIT_STD, rngs=rngs)
        self.c_proj = QLinear(4 * n_embd, n_embd, layer_name=f"{prefix}/c_proj", init_std=proj_std, rngs=rngs)

    def __call__(self, x, *, dropout_key=None, quant: Mapping[str, LayerQuant] | None = None):
        hidden = jax.nn.gelu(self.c_fc(x, quant), approximate=True)  # GPT-2's tanh GELU
        return dropout(self.c_proj(hidden, quant), self.dropout_rate, dropout_key)


class Block(nnx.Module):
    def __init__(self, config, index: int, *, rngs: nnx.Rngs):
        prefix = f"h/{index}"
        self.ln_1 = _layer_norm(config.n_embd, rngs)
        self.attn = CausalSelfAttention(config, f"{prefix}/attn", rngs=rngs)
        self.ln_2 = _layer_norm(config.n_embd, rngs)
        self.mlp = MLP(config, f"{prefix}/mlp", rngs=rngs)

    def __call__(self, x, *, dropout_key=None, quant: Mapping[str, LayerQuant] | None = None):
        x = x + self.attn(self.ln_1(x), dropout_key=_site_key(dropout_key, 0), quant=quant)
        return x + self.mlp(self.ln_2(x), dropout_key=_site_key(dropout_key, 1), quant=quant)


class GPT(nnx.Module):
    """GPT decoder with an untied head; `__call__(idx) -> logits [batch, seq, vocab_size]`."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.block_size = config.block_size
        self.dropout_rate = config.dropout
        embed_init = nnx.initializers.normal(INIT_STD)
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, embedding_init=embed_init, rngs=rngs)
        self.wpe = nnx.Embed(config.block_size, config.n_embd, embedding_init=embed_init, rngs=rngs)
        self.h = nnx.List([Block(config, i, rngs=rngs) for i in range(config.n_layer)])
        self.ln_f = _layer_norm(config.n_embd, rngs)
        self.lm_head = QLinear(
            config.n_embd, config.vocab_size, layer_name="lm_head", init_std=INIT_STD, use_bias=False, rngs=rngs
        )

    def __call__(self, idx: jax.Array, *, dropout_key: jax.Array | None = None, quant: Mapping[str, LayerQuant] | None = None):
        seq = idx.shape[1]
        if seq > self.block_size:
            raise ValueError(f"sequence length {seq} exceeds block_size {self.block_size}")
        x = self.wte(idx) + self.wpe(jnp.arange(seq))[None]
        x = dropout(x, self.dropout_rate, _site_key(dropout_key, len(self.h)))  # blocks use 0..n-1
        for i, block in enumerate(self.h):
            x = block(x, dropout_key=_site_key(dropout_key, i), quant=quant)
        return self.lm_head(self.ln_f(x), quant)


def cross_entropy_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross entropy in float32.

    The target's log-probability is picked with a one-hot product rather than a gather (the other
    terms are exact zeros; XLA may sum in another order): its gradient is then an elementwise
    product instead of a scatter, which XLA:CPU runs about 10x slower (issue 14)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.sum(log_probs * jax.nn.one_hot(targets, log_probs.shape[-1], dtype=log_probs.dtype), axis=-1)
    return -jnp.mean(picked)
