"""Times jitted compute_gradient_stats against one fused Σg² over the same gradient tree, or
the whole research step with two formulations of the metrics.

The tree has the shapes of the default GPT with the GPT-2 vocabulary (6 layers, n_embd 384,
vocab 50304, untied head): about 49M float32 values. Like a real embedding gradient, most
wte rows are exactly zero (tokens absent from the batch), so the dead count has work to do.
Baseline and metrics are timed alternately in one run; the median of the per-round ratios
(wall time, and CPU time of the process as a load-insensitive check) is printed as one JSON
object. `--breakdown` also times each statistic alone, in several formulations, against the
same baseline.

`--compare-metrics FILE` times the research step of bench_step.py (E5M2 + shadow + every metric,
its sizes) built twice: with altgrad_jax.metrics as checked out, and with the functions named by
`--swap` taken from FILE (another version of metrics.py, e.g. one from git history) instead;
FILE `none` leaves their work out, which measures what they cost in the step. The two steps run
alternately, round by round, and the median per-round ratios go both ways.

    python benchmarks/bench_metrics.py [--quick] [--rounds N] [--breakdown]
    git show 9cd2007:altgrad_jax/metrics.py > /tmp/cpu_metrics.py
    python benchmarks/bench_metrics.py --compare-metrics /tmp/cpu_metrics.py [--swap NAMES] [--isolated]
    python benchmarks/bench_metrics.py --compare-metrics none --swap compute_gradient_stats
"""

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from altgrad_jax.config import TrainConfig
from altgrad_jax.metrics import compute_gradient_stats
from altgrad_jax.train_state import init_train_state
from altgrad_jax.train_step import make_train_step

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


# `--compare-metrics none`: the step without the work of these functions (the global norm, which
# the step needs, stays), so the ratio is what they cost: a bound on what any formulation saves.
WITHOUT = {
    "compute_gradient_stats": lambda grads, threshold=THRESHOLD: {"grad_norm": optax.global_norm(grads)},
    "compute_stability_metrics": lambda params: {"param_nan_count": jnp.zeros((), jnp.int32),
                                                 "param_inf_count": jnp.zeros((), jnp.int32)},
}


def load_functions(path: str, names: list[str]) -> dict:
    """The functions `names` of the Python file `path` loaded as a module of its own, or, for
    path "none", the stand-ins of WITHOUT."""
    if path == "none":
        return {name: WITHOUT[name] for name in names}
    spec = importlib.util.spec_from_file_location("other_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: getattr(module, name) for name in names}


@contextlib.contextmanager
def step_module_using(functions: dict):
    """The train step's module with some of the names it imported replaced, and a record of the
    calls, so that the caller can check the step was traced with them."""
    module = sys.modules[make_train_step.__module__]
    calls = []
    saved = {name: getattr(module, name) for name in functions}

    def recorded(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in functions.items():
        setattr(module, name, recorded(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def time_steps(step, state, batch, n_steps: int):
    """(state, wall seconds per step, process CPU seconds per step) over n_steps calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n_steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - wall) / n_steps, (time.process_time() - cpu) / n_steps


def compare_steps(path: str, swap: list[str], quick: bool, rounds: int, steps: int) -> dict:
    """The research step with the checkout's metrics vs the same step with `swap` from `path`."""
    if quick:  # bench_step.py's sizes
        sizes = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8)
    else:
        sizes = dict(n_layer=4, n_head=4, n_embd=256, block_size=128, batch_size=16)
    config = TrainConfig(**sizes, vocab_size=256, use_fp8=True, fp8_format="E5M2", use_shadow=True)
    x = np.random.default_rng(0).integers(0, 256, (sizes["batch_size"], sizes["block_size"]), dtype=np.int32)
    batch = (jnp.asarray(x), jnp.asarray(np.roll(x, -1, axis=1)))

    steps_of, states, first = {}, {}, {}
    for side, functions in (("checkout", {}), ("other", load_functions(path, swap))):
        with step_module_using(functions) as calls:
            steps_of[side] = make_train_step(config)
            state, first[side] = steps_of[side](init_train_state(config), batch)  # traced here
            states[side], _, _ = time_steps(steps_of[side], state, batch, 2)  # burn-in
        if sorted(set(calls)) != sorted(functions):
            raise RuntimeError(f"the step was not traced with {sorted(functions)} from {path} (called: {calls})")
    checkout, other = jax.device_get(first["checkout"]), jax.device_get(first["other"])
    differ = sorted(name for name in checkout.keys() & other.keys()
                    if not np.allclose(checkout[name], other[name], rtol=1e-4, atol=1e-6, equal_nan=True))

    wall = {side: [] for side in steps_of}
    cpu = {side: [] for side in steps_of}
    for index in range(rounds):  # ABBA: each side goes first in every other round
        for side in (("checkout", "other") if index % 2 == 0 else ("other", "checkout")):
            states[side], seconds, cpu_seconds = time_steps(steps_of[side], states[side], batch, steps)
            wall[side].append(seconds)
            cpu[side].append(cpu_seconds)

    def ratio(times, a, b):
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 4)

    return {
        "benchmark": "research step, metrics as checked out vs from another file",
        "backend": jax.default_backend(),
        "sizes": sizes,
        "other": path,
        "swapped": swap,
        "rounds": rounds,
        "steps_per_round": steps,
        "checkout_ms_per_step": round(1e3 * statistics.median(wall["checkout"]), 2),
        "other_ms_per_step": round(1e3 * statistics.median(wall["other"]), 2),
        "other_over_checkout_median_ratio": ratio(wall, "other", "checkout"),
        "checkout_over_other_median_ratio": ratio(wall, "checkout", "other"),
        # Process CPU time (all threads): the work done, less sensitive to other load.
        "other_over_checkout_cpu_time_ratio": ratio(cpu, "other", "checkout"),
        "checkout_over_other_cpu_time_ratio": ratio(cpu, "checkout", "other"),
        "per_round_other_over_checkout": [round(o / c, 3) for o, c in zip(wall["other"], wall["checkout"])],
        "first_step_metrics_differ": differ,  # beyond rtol 1e-4, atol 1e-6
        "metrics_on_one_side_only": len(checkout.keys() ^ other.keys()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small tree (2 layers, vocab 4096); with --compare-metrics bench_step's --quick sizes")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 21, quick 5)")
    parser.add_argument("--breakdown", action="store_true", help="also time each statistic alone")
    parser.add_argument("--compare-metrics", metavar="FILE",
                        help="time the research step with --swap taken from this metrics.py instead")
    parser.add_argument("--swap", default="compute_gradient_stats",
                        help="comma-separated functions of FILE that the step uses (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1, help="steps per round and side (--compare-metrics)")
    parser.add_argument("--isolated", action="store_true",
                        help="with --compare-metrics: time FILE's compute_gradient_stats on the tree instead of the step")
    args = parser.parse_args()
    if args.compare_metrics and not args.isolated:
        rounds = args.rounds or (5 if args.quick else 41)
        print(json.dumps(compare_steps(args.compare_metrics, args.swap.split(","), args.quick, rounds, args.steps)))
        return

    if args.quick:
        shapes = gpt_gradient_shapes(n_layer=2, n_embd=128, vocab=4096, block=256)
    else:
        shapes = gpt_gradient_shapes(n_layer=6, n_embd=384, vocab=50304, block=1024)
    rounds = args.rounds or (5 if args.quick else 21)
    tree = make_gradients(shapes)
    baseline = jax.jit(lambda t: sum(jnp.sum(g * g) for g in jax.tree.leaves(t)))

    candidates = {"compute_gradient_stats": jax.jit(compute_gradient_stats)}
    if args.compare_metrics:
        other = load_functions(args.compare_metrics, ["compute_gradient_stats"])["compute_gradient_stats"]
        candidates["other"] = jax.jit(other)
    result = compare(candidates, baseline, tree, rounds)
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
    if args.compare_metrics:
        report |= {"other": args.compare_metrics, "other_metrics_ms": result["other"]["ms"],
                   "other_ratio_median": result["other"]["ratio"],
                   "other_cpu_time_ratio_median": result["other"]["cpu_ratio"]}
    if args.breakdown:
        report["breakdown"] = compare({k: per_leaf(f) for k, f in BREAKDOWN.items()}, baseline, tree,
                                      max(3, rounds // 3))
    print(json.dumps(report))


if __name__ == "__main__":
    from altgrad_jax.hugepages import restart_with_hugepages

    restart_with_hugepages()  # as the command line runs: malloc's large blocks on huge pages
    main()
