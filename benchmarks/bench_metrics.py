"""Times jitted compute_gradient_stats against one fused Σg² over the same gradient tree.

The tree has the shapes of the default GPT with the GPT-2 vocabulary (6 layers, n_embd 384,
vocab 50304, untied head): about 49M float32 values. Like a real embedding gradient, most
wte rows are exactly zero (tokens absent from the batch), so the dead count has work to do.
Baseline and metrics are timed alternately in one run; the median of the per-round ratios
(wall time, and CPU time of the process as a load-insensitive check) is printed as one JSON
object. `--breakdown` also times each statistic alone, in several
formulations, against the same baseline (that is how the CPU formulation was chosen).

    python benchmarks/bench_metrics.py [--quick] [--rounds N] [--breakdown]
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from altgrad_jax.metrics import compute_gradient_stats

THRESHOLD = 1e-8


def gpt_gradient_shapes(n_layer: int, n_embd: int, vocab: int, block: int) -> dict:
    shapes = {"wte": {"embedding": (vocab, n_embd)}, "wpe": {"embedding": (block, n_embd)}, "h": []}
    for _ in range(n_layer):
        shapes["h"].append({
            "ln_1": {"scale": (n_embd,)},
            "attn": {"c_attn": {"kernel": (n_embd, 3 * n_embd)}, "c_proj": {"kernel": (n_embd, n_embd)}},
            "ln_2": {"scale": (n_embd,)},
            "mlp": {"c_fc": {"kernel": (n_embd, 4 * n_embd)}, "c_proj": {"kernel": (4 * n_embd, n_embd)}},
        })
    shapes["ln_f"] = {"scale": (n_embd,)}
    shapes["lm_head"] = {"kernel": (n_embd, vocab)}
    return shapes


def make_gradients(shapes: dict, seed: int = 0) -> dict:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    grads = jax.tree.unflatten(treedef, [1e-3 * jax.random.normal(k, s) for k, s in zip(keys, leaves)])
    wte = grads["wte"]["embedding"]
    seen = jax.random.uniform(keys[0], (wte.shape[0], 1)) < 0.3
    grads["wte"]["embedding"] = jnp.where(seen, wte, 0.0)
    return jax.block_until_ready(grads)


def per_leaf(statistic):
    return jax.jit(lambda tree: [statistic(g) for g in jax.tree.leaves(tree)])


# Each statistic alone, over every leaf. Names say the formulation.
BREAKDOWN = {
    "sum_sq": lambda g: jnp.sum(g * g),
    "sum": lambda g: jnp.sum(g),
    "max": lambda g: jnp.max(g),
    "max_and_min": lambda g: (jnp.max(g), jnp.min(g)),
    "max_abs": lambda g: jnp.max(jnp.abs(g)),
    "centred_sum_sq": lambda g: jnp.sum(jnp.square(g - 1e-4)),
    "count_bool_int32": lambda g: jnp.sum(jnp.abs(g) < THRESHOLD, dtype=jnp.int32),
    "count_where_f32": lambda g: jnp.sum(jnp.where(jnp.abs(g) < THRESHOLD, 1.0, 0.0)),
    "count_astype_f32": lambda g: jnp.sum((jnp.abs(g) < THRESHOLD).astype(jnp.float32)),
    "count_clip_f32": lambda g: jnp.sum(jnp.clip((THRESHOLD - jnp.abs(g)) * 1e30, 0.0, 1.0)),
    "count_sign_f32": lambda g: jnp.sum(jnp.maximum(jnp.sign(THRESHOLD - jnp.abs(g)), 0.0)),
    "count_ceil_max_f32": lambda g: jnp.sum(jnp.maximum(jnp.ceil(THRESHOLD - jnp.abs(g)), 0.0)),
    "count_ceil_f32": lambda g: jnp.sum(jnp.ceil(THRESHOLD - jnp.abs(g))),
    "variadic_reduce_5": lambda g: jax.lax.reduce(
        (g * g, g, g, -g, (jnp.abs(g) < THRESHOLD).astype(jnp.float32)), (0.0, 0.0, -jnp.inf, -jnp.inf, 0.0),
        lambda a, b: (a[0] + b[0], a[1] + b[1], jnp.maximum(a[2], b[2]), jnp.maximum(a[3], b[3]), a[4] + b[4]),
        tuple(range(g.ndim))),
}


def time_once(fn, tree) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(tree))
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(candidates: dict, baseline, tree, rounds: int) -> dict:
    """Interleaved timing: each round times the baseline right before each candidate."""
    for fn in [baseline, *candidates.values()]:
        for _ in range(3):  # burn-in: compile, warm caches and allocator
            jax.block_until_ready(fn(tree))
    ratios = {name: [] for name in candidates}
    cpu_ratios = {name: [] for name in candidates}
    millis = {name: [] for name in candidates}
    base_ms = []
    for _ in range(rounds):
        for name, fn in candidates.items():
            base_wall, base_cpu = time_once(baseline, tree)
            wall, cpu = time_once(fn, tree)
            base_ms.append(1e3 * base_wall)
            millis[name].append(1e3 * wall)
            ratios[name].append(wall / base_wall)
            cpu_ratios[name].append(cpu / max(base_cpu, 1e-9))
    return {
        "baseline_ms": round(statistics.median(base_ms), 3),
        **{name: {"ratio": round(statistics.median(ratios[name]), 2),
                  "cpu_ratio": round(statistics.median(cpu_ratios[name]), 2),
                  "ms": round(statistics.median(millis[name]), 3)} for name in candidates},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tree (2 layers, vocab 4096)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 21, quick 5)")
    parser.add_argument("--breakdown", action="store_true", help="also time each statistic alone")
    args = parser.parse_args()

    if args.quick:
        shapes = gpt_gradient_shapes(n_layer=2, n_embd=128, vocab=4096, block=256)
    else:
        shapes = gpt_gradient_shapes(n_layer=6, n_embd=384, vocab=50304, block=1024)
    rounds = args.rounds or (5 if args.quick else 21)
    tree = make_gradients(shapes)
    baseline = jax.jit(lambda t: sum(jnp.sum(g * g) for g in jax.tree.leaves(t)))

    result = compare({"compute_gradient_stats": jax.jit(compute_gradient_stats)}, baseline, tree, rounds)
    report = {
        "benchmark": "compute_gradient_stats vs one fused sum of squares",
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "elements": int(sum(g.size for g in jax.tree.leaves(tree))),
        "leaves": len(jax.tree.leaves(tree)),
        "rounds": rounds,
        "baseline_ms": result["baseline_ms"],
        "metrics_ms": result["compute_gradient_stats"]["ms"],
        "ratio_median": result["compute_gradient_stats"]["ratio"],
        # Process CPU time ratio: the work done, less sensitive to other load on the machine.
        "cpu_time_ratio_median": result["compute_gradient_stats"]["cpu_ratio"],
    }
    if args.breakdown:
        report["breakdown"] = compare({k: per_leaf(f) for k, f in BREAKDOWN.items()}, baseline, tree,
                                      max(3, rounds // 3))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
