"""Research train step vs a plain float32 AdamW step, same model and batch, interleaved.

Research: E5M2 weights, activations and gradients, FP32 shadow, every metric (make_train_step).
Baseline: value_and_grad of the float32 loss + the same optax AdamW update, nothing else.
Prints one JSON object: median time ratio, ms/step and tokens/s for both.

    python benchmarks/bench_step.py            # n_layer 4, n_embd 256, block 128, batch 16
    python benchmarks/bench_step.py --quick    # n_layer 2, n_embd 64, block 64, batch 8
    python benchmarks/bench_step.py --update-study   # also the research step with E5M2 master
                                                     # weights and stochastic update rounding
    python benchmarks/bench_step.py --whatif         # also what-if shadowing (every step, and the
                                                     # steps between intervals of 50), averaged
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altgrad_jax.config import TrainConfig
from altgrad_jax.model import cross_entropy_loss
from altgrad_jax.optimizer import make_optimizer
from altgrad_jax.train_state import init_train_state, model_structure
from altgrad_jax.train_step import make_train_step


def make_plain_step(config):
    graphdef, _ = model_structure(config)
    optimizer = make_optimizer(config)

    def loss_fn(params, batch):
        x, y = batch
        return cross_entropy_loss(nnx.merge(graphdef, params)(x), y)

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


def time_steps(step, carry, batch, n_steps):
    start = time.perf_counter()
    for _ in range(n_steps):
        carry, out = step(carry, batch)
    jax.block_until_ready((carry, out))
    return carry, (time.perf_counter() - start) / n_steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model for a fast check")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=None, help="steps per round and side")
    parser.add_argument("--update-study", action="store_true",
                        help="also time the research step with master_weights E5M2 + stochastic rounding")
    parser.add_argument("--whatif", action="store_true",
                        help="also time what-if shadowing: on every step, and between intervals of 50")
    args = parser.parse_args()
    if args.quick:
        sizes = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8)
        rounds, steps = args.rounds or 5, args.steps or 5
    else:
        sizes = dict(n_layer=4, n_head=4, n_embd=256, block_size=128, batch_size=16)
        rounds, steps = args.rounds or 5, args.steps or 3
    research_config = TrainConfig(**sizes, vocab_size=256, use_fp8=True, fp8_format="E5M2", use_shadow=True)
    plain_config = research_config.replace(use_fp8=False, use_shadow=False)

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (sizes["batch_size"], sizes["block_size"]), dtype=np.int32)
    batch = (jnp.asarray(x), jnp.asarray(np.roll(x, -1, axis=1)))

    sides = {"research": research_config}
    if args.update_study:
        sides["research_e5m2_master_sr"] = research_config.replace(master_weights="E5M2", update_rounding="stochastic")
    if args.whatif:  # the timed steps (2 onwards) of the interval-50 side are all between intervals
        sides["whatif_active"] = research_config.replace(whatif_interval=1)
        sides["whatif_between"] = research_config.replace(whatif_interval=50)
    steps_of = {name: make_train_step(config) for name, config in sides.items()}
    states = {name: init_train_state(config) for name, config in sides.items()}
    plain_step = make_plain_step(plain_config)
    plain_state = init_train_state(plain_config)
    plain_carry = (plain_state.params, plain_state.opt_state)

    compile_s = {}
    for name in sides:
        compile_start = time.perf_counter()
        states[name], _ = time_steps(steps_of[name], states[name], batch, 2)  # burn-in incl. compile
        compile_s[name] = time.perf_counter() - compile_start
    plain_carry, _ = time_steps(plain_step, plain_carry, batch, 2)

    # Each side's round starts with one untimed step: a training loop runs its steps back to
    # back, and the first step after the other sides' rounds may refault its temp buffer
    # (benchmarks/README.md, "The first step after a pause").
    times = {name: [] for name in sides}
    plain_times = []
    for _ in range(rounds):
        for name in sides:
            states[name], _ = time_steps(steps_of[name], states[name], batch, 1)
            states[name], elapsed = time_steps(steps_of[name], states[name], batch, steps)
            times[name].append(elapsed)
        plain_carry, _ = time_steps(plain_step, plain_carry, batch, 1)
        plain_carry, t_plain = time_steps(plain_step, plain_carry, batch, steps)
        plain_times.append(t_plain)
    research_times = times["research"]
    research_compile_s = compile_s["research"]

    extra = {f"{name}_over_research_median_ratio": statistics.median(t / r for t, r in zip(times[name], research_times))
             for name in sides if name != "research"}
    if args.whatif:
        extra["whatif_interval_50_over_research"] = (
            extra["whatif_active_over_research_median_ratio"] + 49 * extra["whatif_between_over_research_median_ratio"]) / 50
    tokens = sizes["batch_size"] * sizes["block_size"]
    research_ms, plain_ms = statistics.median(research_times) * 1e3, statistics.median(plain_times) * 1e3
    print(json.dumps({
        "benchmark": "train_step",
        "backend": jax.default_backend(),
        "sizes": sizes,
        "rounds": rounds,
        "steps_per_round": steps,
        "median_ratio": statistics.median(r / p for r, p in zip(research_times, plain_times)),
        "research_ms_per_step": research_ms,
        "plain_ms_per_step": plain_ms,
        "research_tokens_per_s": tokens / research_ms * 1e3,
        "plain_tokens_per_s": tokens / plain_ms * 1e3,
        "research_compile_s": research_compile_s,
        "target_ratio_max": 2.3,
        **extra,
    }))


if __name__ == "__main__":
    from altgrad_jax.hugepages import restart_with_hugepages

    restart_with_hugepages()  # as the command line runs: malloc's large blocks on huge pages
    main()
