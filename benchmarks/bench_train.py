"""Full training loop (altgrad_jax.loop.trainer.train) against the bare jitted step, per config and variant.

    python benchmarks/bench_train.py [--quick] [--steps N] [--rounds R] [--configs default,gpt2_small]
                                     [--variants fp32,fp8,fp8_shadow] [--breakdown]

For each config (configs/default.yaml, configs/gpt2_small.yaml; on the CPU gpt2_small keeps its
width, heads and vocabulary but has 2 layers, block 128 and batch 4, so that it fits the time)
and each variant (fp32: no quantization, no shadow; fp8: E5M2 as the config says, no shadow;
fp8_shadow: E5M2 and the FP32 shadow), alternately, round after round:
- loop: `trainer.train` for N steps in a fresh temporary out_dir with W&B disabled: pystdlib
  batches, the one-step-late metrics, the local metrics log and progress lines (to stderr), and
  an evaluation and an Orbax checkpoint every N/2 steps and at the end. eval_iters is scaled so
  that evaluation takes the same share of the steps as in the config file (default.yaml: 10
  batches every 50 steps); checkpoints come more often than in the file.
  The jitted step and eval functions are compiled before (the trainer is handed the compiled
  ones), so no compilation is timed. ms/step is taken over the steady window between the first
  and the last logged step (periodic eval and checkpoint included); the start (trackers, first
  evaluation) and the end (last save written) are reported apart as startup_s / teardown_s.
- bare: the same compiled step called N times on one fixed device batch, block_until_ready.
ratio = loop ms/step / bare ms/step (median over rounds); target on the CPU: <= 1.10. Also, from
the gaps between logged steps: steady_ms_per_step (median gap: data, metrics fetch, logging),
eval_extra_s and checkpoint_extra_s (the extra time of the gap holding an eval / a save), and
ratio_at_config_checkpoint_interval: the loop with checkpoints as rare as in the config file.
On a GPU also the model FLOPs utilisation: 6 * N_matmul * tokens + attention 12 * L * T * d *
tokens per step (nanoGPT's estimate; N_matmul = parameters without the wte/wpe lookups),
against the dense BF16 peak of the device (H100/H200 SXM: 989 TFLOP/s). The model runs float32
matmuls (TF32 on tensor cores at XLA's default precision), whose dense peak is half that; the
shadow's second forward and backward are not counted as model FLOPs.
`--breakdown` adds the host seconds per step spent in each part of the loop (fetching metrics,
batches, trackers, progress, eval, checkpoint save calls) for the last round.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from altgrad_jax.config import load_config  # noqa: E402
from altgrad_jax.data import get_batch, load_dataset  # noqa: E402
from altgrad_jax.loop import trainer  # noqa: E402
from altgrad_jax.loop.tracker import Tracker  # noqa: E402
from altgrad_jax.sharding import make_mesh, put_batch, put_state  # noqa: E402
from altgrad_jax.train_state import init_train_state  # noqa: E402
from altgrad_jax.train_step import make_eval_step, make_train_step  # noqa: E402

TARGET_RATIO_MAX = 1.10
# Dense (no sparsity) BF16 tensor-core peaks, FLOP/s, by device-kind substring.
BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
VARIANTS = {
    "fp32": dict(use_fp8=False, use_shadow=False),
    "fp8": dict(use_fp8=True, use_shadow=False),
    "fp8_shadow": dict(use_fp8=True, use_shadow=True),
}
CPU_SIZES = {"default": {}, "gpt2_small": dict(n_layer=2, block_size=128, batch_size=4)}
QUICK_SIZES = {"default": {}, "gpt2_small": dict(n_layer=1, block_size=64, batch_size=2, vocab_size=8192)}


def device_name() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return "-".join(device.device_kind.lower().replace("_", " ").split())


def bench_config(name: str, variant: str, steps: int, quick: bool, out_dir: str):
    """The config file's run, shortened to `steps` with an eval and a checkpoint every steps/2.

    eval_iters is scaled with the eval interval so that evaluation costs the same share of the
    run as in the config file; checkpoints come more often than in the file (conservative).
    """
    config = load_config(REPO / "configs" / f"{name}.yaml")
    on_cpu = jax.default_backend() == "cpu"
    sizes = (QUICK_SIZES if quick else CPU_SIZES if on_cpu else {})[name]
    interval = max(steps // 2, 1)
    eval_iters = max(1, round(config.eval_iters * interval / config.eval_interval))
    return config.replace(**VARIANTS[variant], **sizes, max_steps=steps, warmup_steps=min(config.warmup_steps, steps),
                          log_interval=1, eval_interval=interval, eval_iters=eval_iters, checkpoint_interval=interval,
                          out_dir=out_dir, checkpoint_dir=None, wandb_mode="disabled", tags=())


class StepClock(Tracker):
    """Records when each step is logged: the loop's own pace, as the host sees it."""

    def __init__(self):
        self.times = {}

    def log_step(self, step, metrics):
        self.times[int(step)] = time.perf_counter()

    def alert(self, title, text, level="INFO", *, step=None):
        pass

    def finish(self, exit_code=None):
        pass


@contextlib.contextmanager
def patched(module, name, replacement):
    original = getattr(module, name)  # AttributeError if the trainer renamed it: update this script
    setattr(module, name, replacement)
    try:
        yield original
    finally:
        setattr(module, name, original)


class HostTimers:
    """Wraps trainer-module functions to add up the host time spent in each."""

    def __init__(self):
        self.seconds = {}

    def wrap(self, label, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
        return timed


def run_loop(config, dataset, mesh, compiled_step, compiled_eval, timers: HostTimers | None):
    """(train() seconds, StepClock) for one fresh run; nothing is compiled inside."""
    clock = StepClock()
    state = put_state(init_train_state(config), mesh)
    jax.block_until_ready(state)
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(trainer, "make_train_step", lambda c: compiled_step))
        stack.enter_context(patched(trainer, "make_eval_step", lambda c: compiled_eval))
        make_trackers = trainer.make_trackers
        stack.enter_context(patched(trainer, "make_trackers", lambda *a: make_trackers(*a) + [clock]))
        if timers is not None:
            for name in ("get_batch", "put_batch", "to_host_scalars"):
                stack.enter_context(patched(trainer, name, timers.wrap(name, getattr(trainer, name))))
            stack.enter_context(patched(trainer.Evaluator, "__call__", timers.wrap("evaluate", trainer.Evaluator.__call__)))
            manager_cls = trainer.CheckpointManager
            stack.enter_context(patched(manager_cls, "save", timers.wrap("checkpoint_save", manager_cls.save)))
            stack.enter_context(patched(trainer.AlertMonitor, "check", timers.wrap("alerts", trainer.AlertMonitor.check)))
            stack.enter_context(patched(trainer.Progress, "update", timers.wrap("progress", trainer.Progress.update)))
            stack.enter_context(patched(trainer.LocalTracker, "log_step", timers.wrap("local_log", trainer.LocalTracker.log_step)))
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # progress lines: keep stdout for JSON
        start = time.perf_counter()
        exit_code = trainer.train(config, dataset, mesh, state, 0, {})
        total = time.perf_counter() - start
    if exit_code != 0:
        raise RuntimeError(f"train() exited with status {exit_code} for {config.out_dir}")
    return start, total, clock


def window_figures(times: dict[int, float], interval: int) -> dict[str, float]:
    """Per-step figures from the times steps 1..N were logged.

    The evaluation at step k runs before step k is published, the checkpoint save after it: so
    the gap before log(k) holds the eval and the gap after it the save's blocking part.
    """
    steps = sorted(times)
    gaps = {s: times[s] - times[p] for p, s in zip(steps, steps[1:])}
    steady = statistics.median(gaps.values())
    eval_steps = [s for s in gaps if s % interval == 0]
    save_gaps = [s + 1 for s in steps if s % interval == 0 and s + 1 in gaps]
    return {
        "loop_s": (times[steps[-1]] - times[steps[0]]) / (steps[-1] - steps[0]),
        "steady_s": steady,
        "eval_extra_s": statistics.mean(gaps[s] - steady for s in eval_steps) if eval_steps else 0.0,
        "checkpoint_extra_s": statistics.mean(gaps[s] - steady for s in save_gaps) if save_gaps else 0.0,
    }


def run_bare(compiled_step, state, batch, steps):
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled_step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / steps


def model_flops_per_step(config, params) -> tuple[float, int]:
    """(model FLOPs of one forward + backward, matmul parameter count); `params` concrete or abstract."""
    n_matmul = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    n_matmul -= params["wte"]["embedding"].size + params["wpe"]["embedding"].size
    tokens = config.batch_size * config.block_size
    attention = 12 * config.n_layer * config.block_size * config.n_embd
    return float((6 * n_matmul + attention) * tokens), int(n_matmul)


def bench_one(name, variant, args, dataset_cache):
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        config = bench_config(name, variant, args.steps, args.quick, os.path.join(tmp, "run"))
        file_checkpoint_interval = load_config(REPO / "configs" / f"{name}.yaml").checkpoint_interval
        key = (config.vocab_size, config.block_size)
        if key not in dataset_cache:
            dataset_cache[key] = load_dataset(config.data, vocab_size=config.vocab_size, block_size=config.block_size,
                                              progress=False)
        dataset = dataset_cache[key]
        mesh = make_mesh(config.mesh, config.batch_size)

        compile_start = time.perf_counter()
        step = make_train_step(config)
        evaluate = make_eval_step(config)
        batch = put_batch(get_batch(dataset.train, seed=config.seed, step=0, batch_size=config.batch_size,
                                    block_size=config.block_size), mesh)
        bare_state = put_state(init_train_state(config), mesh)
        flops, n_matmul = model_flops_per_step(config, bare_state.params)
        jax.block_until_ready(evaluate(bare_state, batch))
        bare_state, _ = run_bare(step, bare_state, batch, 2)  # compiles, then burns in
        compile_s = time.perf_counter() - compile_start

        rounds, timers = [], None
        for round_index in range(args.rounds):
            if args.breakdown and round_index == args.rounds - 1:
                timers = HostTimers()
            out_dir = os.path.join(tmp, f"run{round_index}")
            run_config = config.replace(out_dir=out_dir)
            start, total, clock = run_loop(run_config, dataset, mesh, step, evaluate, timers)
            bare_state, bare_s = run_bare(step, bare_state, batch, args.steps)
            rounds.append(window_figures(clock.times, run_config.eval_interval) | {
                "bare_s": bare_s, "total_s": total, "startup_s": min(clock.times.values()) - start,
                "teardown_s": start + total - max(clock.times.values())})

    tokens = config.batch_size * config.block_size

    def median(key):
        return statistics.median(r[key] for r in rounds)

    loop_ms, bare_ms = median("loop_s") * 1e3, median("bare_s") * 1e3
    # The same loop with checkpoints as rare as in the config file (evaluation already has its share).
    at_config = [(r["steady_s"] + r["eval_extra_s"] / config.eval_interval
                  + r["checkpoint_extra_s"] / file_checkpoint_interval) / r["bare_s"] for r in rounds]
    result = {
        "config": name, "variant": variant,
        "sizes": {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                                   "batch_size")},
        "steps": args.steps, "rounds": args.rounds, "eval_and_checkpoint_every": config.eval_interval,
        "eval_iters": config.eval_iters,
        "median_ratio": statistics.median(r["loop_s"] / r["bare_s"] for r in rounds),
        "ratio_at_config_checkpoint_interval": statistics.median(at_config),
        "config_checkpoint_interval": file_checkpoint_interval,
        "loop_ms_per_step": loop_ms, "bare_ms_per_step": bare_ms,
        "steady_ms_per_step": median("steady_s") * 1e3,
        "eval_extra_s": median("eval_extra_s"), "checkpoint_extra_s": median("checkpoint_extra_s"),
        "loop_tokens_per_s": tokens / loop_ms * 1e3, "bare_tokens_per_s": tokens / bare_ms * 1e3,
        "startup_s": median("startup_s"), "teardown_s": median("teardown_s"),
        "compile_s": compile_s,
    }
    result["matmul_params"] = n_matmul
    result["model_tflop_per_step"] = flops / 1e12
    peak = next((v for k, v in BF16_PEAK.items() if k in jax.devices()[0].device_kind), None)
    if jax.default_backend() == "gpu" and peak is not None:
        result["mfu_loop_vs_bf16_peak"] = flops / (loop_ms / 1e3) / peak
        result["mfu_bare_vs_bf16_peak"] = flops / (bare_ms / 1e3) / peak
        result["bf16_peak_tflops"] = peak / 1e12
    if timers is not None:
        result["host_s_per_step"] = {k: v / args.steps for k, v in sorted(timers.seconds.items())}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one round, smaller gpt2_small")
    parser.add_argument("--steps", type=int, default=None, help="training steps per loop run (even)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved loop/bare rounds")
    parser.add_argument("--configs", default="default,gpt2_small")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--breakdown", action="store_true", help="host time per loop part (last round)")
    args = parser.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    args.steps = args.steps or (20 if args.quick else 60 if on_cpu else 100)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.steps < 4:
        parser.error("--steps must be at least 4")
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"--variants: unknown {variant!r}; choose from {sorted(VARIANTS)}")

    dataset_cache, results = {}, []
    for name in args.configs.split(","):
        for variant in args.variants.split(","):
            results.append(bench_one(name, variant, args, dataset_cache))
            print(f"bench_train: {name}/{variant} ratio {results[-1]['median_ratio']:.3f}", file=sys.stderr)
    print(json.dumps({
        "benchmark": "train_loop", "backend": jax.default_backend(), "device": device_name(),
        "device_count": jax.device_count(), "target_ratio_max": TARGET_RATIO_MAX,
        "worst_ratio": max(r["median_ratio"] for r in results), "results": results,
    }))


if __name__ == "__main__":
    from altgrad_jax.hugepages import restart_with_hugepages

    restart_with_hugepages()  # as the command line runs: malloc's large blocks on huge pages
    main()
