"""Where the plain step's time goes, here (XLA:CPU) and in PyTorch: one per-op table (issue 14).

The same plain nanoGPT step as bench_vs_torch.py. JAX side: a `jax.profiler` trace of the compiled
step; each executed HLO instruction (thunk) is put in a category by the Python frames XLA keeps in
its metadata (QLinear.__call__ -> matmul, CausalSelfAttention.__call__ -> attention, optax ->
optimizer, ...). PyTorch side: `torch.profiler`, each aten op by its name. Times are ms per step,
summed over ops; ops that run at the same time on different threads both count, so a column can
add up to more than the step's wall time (given on the last row, from a run without profiler).
The row before it is the wall time no traced op covers: on XLA:CPU, matmuls that Eigen runs
after their thunk has returned (with this package's default flags, most matmul time). The JAX
column sums single-threaded thunks, some of which run at the same time; PyTorch's ops each use
every thread, so compare a row's share of its column rather than the two columns' milliseconds.
Two more rows come from the same unprofiled run: minor page faults and kernel (system) CPU time
per step, which no op's time shows and which page-faulting temp buffers make large
(altgrad_jax/hugepages.py).

    PYTHONPATH=. python benchmarks/profile_vs_torch.py --sizes small --out /tmp/profile

Writes the optimised HLO and the traces under --out; prints the table as markdown on stderr and
the numbers as one JSON object on stdout. Without PyTorch only the JAX column is filled.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_torch import SIZES, VOCAB, jax_runner, torch_runner, torch_step_factory  # noqa: E402

CATEGORIES = ("matmul (linear layers)", "attention (QK^T, mask, softmax, PV)", "LayerNorm", "GELU",
              "embedding", "cross-entropy", "optimizer (clip + AdamW)", "residual adds, other")

# Innermost first: the first function on an instruction's stack that names a category wins.
JAX_FUNCTIONS = (
    ("QLinear.__call__", 0), ("CausalSelfAttention.__call__", 1), ("LayerNorm.__call__", 2),
    ("MLP.__call__", 3), ("Embed.__call__", 4), ("cross_entropy_loss", 5),
)
JAX_OPTIMIZER_FILES = ("/optax/", "altgrad_jax/optimizer.py")

TORCH_OPS = (  # aten op name -> category, by regular expression, first match wins
    (r"^aten::(mm|addmm|bmm|linear|matmul|t|transpose)$", 0),
    (r"scaled_dot_product|flash_attention", 1),
    (r"layer_norm", 2),
    (r"gelu", 3),
    (r"embedding|index_select|index_add", 4),
    (r"log_softmax|nll_loss|cross_entropy", 5),
    (r"^aten::_foreach|^aten::(norm|linalg_vector_norm|stack|clamp|_fused_adamw|lerp|addcdiv|addcmul|sqrt)", 6),
)


def parse_hlo_frames(hlo: str) -> dict[str, list[tuple[str, str]]]:
    """instruction name -> [(file, function)] innermost first, from the module's frame tables."""
    def table(name):
        match = re.search(rf"^{name}\n(.*?)(?:\n\n|\n(?=[A-Z]\w+\n))", hlo, re.S | re.M)
        return match.group(1).splitlines() if match else []

    files = {int(i): s.strip('"') for i, s in (line.split(" ", 1) for line in table("FileNames"))}
    functions = {int(i): s.strip('"') for i, s in (line.split(" ", 1) for line in table("FunctionNames"))}
    locations = {}
    for line in table("FileLocations"):
        i, rest = line.split(" ", 1)
        fields = dict(re.findall(r"(\w+)=(\d+)", rest))
        locations[int(i)] = (files[int(fields["file_name_id"])], functions[int(fields["function_name_id"])])
    frames = {}
    for line in table("StackFrames"):
        i, rest = line.split(" ", 1)
        fields = dict(re.findall(r"(\w+)=(\d+)", rest))
        # parent_frame_id is the parent's id + 1 (0: no parent), as XLA prints it.
        frames[int(i)] = (int(fields["file_location_id"]), int(fields["parent_frame_id"]) - 1)

    def stack(frame_id):
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            location, parent = frames[frame_id]
            out.append(locations[location])
            frame_id = parent
        return out

    instructions = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?stack_frame_id=(\d+)", hlo, re.M):
        instructions[match.group(1)] = stack(int(match.group(2)))
    return instructions


def timed_with_kernel_cost(run, steps, repeats=3):
    """Median seconds per step over `repeats` calls of run(steps), and the minor page faults and
    kernel CPU seconds per step over all of them (getrusage: the process, every thread)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = statistics.median(run(steps) for _ in range(repeats))
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = steps * repeats
    return wall, (after.ru_minflt - before.ru_minflt) / n, (after.ru_stime - before.ru_stime) / n


def jax_category(stack) -> int:
    if stack and any(part in stack[0][0] for part in JAX_OPTIMIZER_FILES):
        return 6
    for _, function in stack:
        if any(part in function for part in ("update_fn", "apply_updates")):
            return 6
        for name, category in JAX_FUNCTIONS:
            if function == name or function.startswith(name + ".<locals>"):
                return category
    return 7


def profile_jax(sizes, steps, out: Path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_step import make_plain_step

    from altgrad_jax.config import TrainConfig
    from altgrad_jax.train_state import init_train_state

    config = TrainConfig(**sizes, vocab_size=VOCAB, learning_rate=3e-4, warmup_steps=0, max_steps=1000)
    step = make_plain_step(config)
    state = init_train_state(config)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (sizes["batch_size"], sizes["block_size"] + 1))
    batch = (jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32))
    carry = (state.params, state.opt_state)
    hlo = step.lower(carry, batch).compile().as_text()
    (out / "jax_step.optimized.hlo").write_text(hlo)
    stacks = parse_hlo_frames(hlo)

    run = jax_runner(step, carry, batch)
    run(3)
    wall, faults, sys_s = timed_with_kernel_cost(run, steps)
    trace_dir = out / "jax_trace"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        run(steps)
    trace = json.load(gzip.open(sorted(glob.glob(str(trace_dir / "**" / "*.json.gz"), recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals, unknown = [0.0] * len(CATEGORIES), collections.Counter()
    for event in events:
        if event.get("ph") != "X" or event["name"] not in stacks:
            continue
        category = jax_category(stacks[event["name"]])
        totals[category] += event.get("dur", 0) / 1e3 / steps
        if category == 7:
            unknown[event["name"]] += event.get("dur", 0) / 1e3 / steps
    return totals, wall * 1e3, unknown.most_common(8), (faults, sys_s * 1e3)


def profile_torch(sizes, steps, threads, out: Path):
    try:
        import torch
    except ImportError:
        return None, None, [], None
    torch.set_num_threads(threads)
    import numpy as np

    step = torch_step_factory(torch, sizes)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (sizes["batch_size"], sizes["block_size"] + 1))
    batch = (torch.as_tensor(tokens[:, :-1]), torch.as_tensor(tokens[:, 1:]))

    run = torch_runner(step, batch)
    run(3)
    wall, faults, sys_s = timed_with_kernel_cost(run, steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run(steps)
    profiler.export_chrome_trace(str(out / "torch_trace.json"))
    totals, unknown = [0.0] * len(CATEGORIES), collections.Counter()
    for entry in profiler.key_averages():
        ms = entry.self_cpu_time_total / 1e3 / steps
        category = next((c for pattern, c in TORCH_OPS if re.search(pattern, entry.key)), 7)
        totals[category] += ms
        if category == 7:
            unknown[entry.key] += ms
    return totals, wall * 1e3, unknown.most_common(8), (faults, sys_s * 1e3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="benchmarks/results/profile")
    args = parser.parse_args()
    result = {}
    for name in args.sizes.split(","):
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        jax_ms, jax_wall, jax_other, jax_kernel = profile_jax(SIZES[name], args.steps, out)
        torch_ms, torch_wall, torch_other, torch_kernel = profile_torch(SIZES[name], args.steps, args.threads, out)
        result[name] = {"jax_ms": dict(zip(CATEGORIES, jax_ms)), "jax_wall_ms": jax_wall,
                        "torch_ms": dict(zip(CATEGORIES, torch_ms)) if torch_ms else None,
                        "torch_wall_ms": torch_wall, "jax_other_top": jax_other, "torch_other_top": torch_other,
                        "jax_minor_faults_per_step": jax_kernel[0], "jax_kernel_ms_per_step": jax_kernel[1],
                        "torch_minor_faults_per_step": torch_kernel[0] if torch_kernel else None,
                        "torch_kernel_ms_per_step": torch_kernel[1] if torch_kernel else None}
        lines = [f"\n{name} ({SIZES[name]}), ms per step", "", "| op | JAX (XLA:CPU) | PyTorch | JAX / PyTorch |",
                 "|---|---|---|---|"]
        rows = list(zip(CATEGORIES, jax_ms, torch_ms or [float("nan")] * len(CATEGORIES)))
        # XLA's Eigen matmuls run on Eigen's own pool after their thunk returns, outside any
        # traced op: with YNNPACK dots off, most of the matmul time lands in this row.
        rows.append(("wall time in no traced op", max(jax_wall - sum(jax_ms), 0.0),
                     max(torch_wall - sum(torch_ms), 0.0) if torch_ms else float("nan")))
        rows.append(("step wall time (no profiler)", jax_wall, torch_wall or float("nan")))
        for label, j, t in rows:
            lines.append(f"| {label} | {j:.1f} | {t:.1f} | {j / t if t else float('nan'):.2f} |")
        nan2 = (float("nan"), float("nan"))
        for label, j, t in (("minor page faults per step", jax_kernel[0], (torch_kernel or nan2)[0]),
                            ("kernel (sys) CPU ms per step", jax_kernel[1], (torch_kernel or nan2)[1])):
            lines.append(f"| {label} | {j:.0f} | {t:.0f} | |")
        print("\n".join(lines), file=sys.stderr)
    print(json.dumps({"benchmark": "profile_vs_torch", "steps": args.steps, "threads": args.threads,
                      "results": result}))


if __name__ == "__main__":
    from altgrad_jax.hugepages import restart_with_hugepages

    restart_with_hugepages()  # as the command line runs: malloc's large blocks on huge pages
    main()
