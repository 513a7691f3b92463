"""benchmarks/profile_vs_torch.py puts each compiled HLO instruction in the category of the Python
function that emitted it; a wrong frame table would misfile the whole per-op table."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profile_vs_torch import CATEGORIES, jax_category, parse_hlo_frames  # noqa: E402


class LayerNorm:
    def __call__(self, x):
        return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)


class QLinear:
    def __call__(self, x, w):
        return x @ w


def cross_entropy_loss(logits):
    return -jax.nn.log_softmax(logits).mean()


def model(x, w):
    return cross_entropy_loss(QLinear()(LayerNorm()(x), w))


def test_every_instruction_is_filed_under_the_function_that_emitted_it():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
    hlo = jax.jit(model).lower(x, w).compile().as_text()
    stacks = parse_hlo_frames(hlo)
    dots = [name for name, stack in stacks.items() if name.startswith("dot")]
    assert dots and all(CATEGORIES[jax_category(stacks[name])].startswith("matmul") for name in dots)
    assert all("model" in [function for _, function in stack] for stack in stacks.values()), "model() is on every stack"
    found = {CATEGORIES[jax_category(stack)] for stack in stacks.values()}
    assert {"LayerNorm", "cross-entropy"} <= found, found
