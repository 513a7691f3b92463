"""The plain nanoGPT training step here (JAX/Flax) against the same step in PyTorch, alternating.

Both sides: token + position embeddings, pre-LayerNorm blocks (causal attention, tanh-GELU MLP),
final LayerNorm, untied head, mean cross entropy, global-norm clipping at 1.0 and AdamW
(weight decay 0.1 on matrices), float32, random tokens, the same sizes and thread count. PyTorch
uses F.scaled_dot_product_attention. Rounds alternate (JAX, PyTorch) and the median of the
per-round ratios is printed as one JSON object. Without PyTorch it prints one line and exits 0.

    PYTHONPATH=. python benchmarks/bench_vs_torch.py                 # small and medium sizes
    PYTHONPATH=. python benchmarks/bench_vs_torch.py --sizes small --rounds 3
    PYTHONPATH=. python benchmarks/bench_vs_torch.py --research   # also this project's research step

`--research` also times the research step (E5M2 + FP32 shadow + every metric) in the same rounds
and prints its ratio to PyTorch's plain step. The PyTorch research bench of issue 14 is not in this
repository; it took 3.2-3.6x its own plain step, so research speed-up = 3.2..3.6 / that ratio.

Each side's round starts with `--settle` untimed steps (default 1), timed apart as
`first_step_ms` (their mean per step, median over rounds): a side waits idle while the others
run their rounds, and a training loop runs its steps back to back. On a VM whose balloon driver
hands freed memory back to the host (virtio free page reporting), the first step after a pause
refaults XLA's per-step temp buffer from the host (benchmarks/README.md, "The first step after
a pause"), which a back-to-back loop pays only after its own pauses (evaluation, checkpoints).
"""

import argparse
import collections
import json
import math
import os
import resource
import statistics
import sys
import time

SIZES = {  # the sizes of issue 14's measurements
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16),
    "medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=12),
}
VOCAB = 256
PYTORCH_RESEARCH_OVER_PLAIN = (3.2, 3.6)  # the PyTorch bench's research step / its plain step (issue 14)


def torch_step_factory(torch, sizes):
    nn, F = torch.nn, torch.nn.functional
    d, heads = sizes["n_embd"], sizes["n_head"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(sizes["block_size"], d)
            self.h = nn.ModuleList(Block() for _ in range(sizes["n_layer"]))
            self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, VOCAB, bias=False)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.95))

    def step(idx, targets):
        loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    return step


def jax_runner(step, carry, batch):
    """run(n) -> seconds per step over n steps (bench_step.time_steps), the carry kept between calls."""
    from bench_step import time_steps

    def run(n):
        nonlocal carry
        carry, seconds = time_steps(step, carry, batch, n)
        return seconds

    return run


def torch_runner(step, batch):
    """run(n) -> seconds per step of the PyTorch step over n steps (the last loss read back)."""
    def run(n):
        start = time.perf_counter()
        for _ in range(n):
            loss = step(*batch)
        loss.item()
        return (time.perf_counter() - start) / n

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium", help="comma-separated: small, medium")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed steps at the start of each side's round (timed apart as first_step_ms)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--research", action="store_true", help="also time the research step")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("bench_vs_torch: PyTorch is not installed (pip install torch); skipped")
        return
    torch.set_num_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_step import make_plain_step

    from altgrad_jax.config import TrainConfig
    from altgrad_jax.train_state import init_train_state
    from altgrad_jax.train_step import make_train_step

    results = {}
    for name in args.sizes.split(","):
        sizes = SIZES[name]
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, VOCAB, (sizes["batch_size"], sizes["block_size"] + 1))
        config = TrainConfig(**sizes, vocab_size=VOCAB, learning_rate=3e-4, warmup_steps=0, max_steps=1000)
        jax_step = make_plain_step(config)
        state = init_train_state(config)
        carry = (state.params, state.opt_state)
        jax_batch = (jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32))
        if args.research:
            research_config = config.replace(use_fp8=True, fp8_format="E5M2", use_shadow=True)
            research_step, research_state = make_train_step(research_config), init_train_state(research_config)
        torch_step = torch_step_factory(torch, sizes)
        torch_batch = (torch.as_tensor(tokens[:, :-1]), torch.as_tensor(tokens[:, 1:]))

        run_jax = jax_runner(jax_step, carry, jax_batch)
        if args.research:
            run_research = jax_runner(research_step, research_state, jax_batch)

        run_torch = torch_runner(torch_step, torch_batch)

        run_jax(2), run_torch(2)  # burn-in (compile, allocator warm-up)
        if args.research:
            run_research(2)
        jax_times, torch_times, research_times = [], [], []
        faults = collections.Counter()  # minor page faults per side, over the timed steps
        first_steps = collections.defaultdict(list)  # seconds per settle step, per side

        def timed(side, run, times):
            if args.settle:
                first_steps[side].append(run(args.settle))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times.append(run(args.steps))
            faults[side] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        for _ in range(args.rounds):
            timed("jax", run_jax, jax_times)
            timed("torch", run_torch, torch_times)
            if args.research:
                timed("research", run_research, research_times)
        results[name] = {
            "sizes": sizes,
            "jax_ms_per_step": statistics.median(jax_times) * 1e3,
            "torch_ms_per_step": statistics.median(torch_times) * 1e3,
            "jax_over_torch_median_ratio": statistics.median(j / t for j, t in zip(jax_times, torch_times)),
            "minor_page_faults_per_step": {side: n / (args.rounds * args.steps) for side, n in faults.items()},
            "first_step_ms": {side: statistics.median(t) * 1e3 for side, t in first_steps.items()},
        }
        if args.research:
            ratio = statistics.median(r / t for r, t in zip(research_times, torch_times))
            results[name].update({
                "research_ms_per_step": statistics.median(research_times) * 1e3,
                "research_over_torch_plain_median_ratio": ratio,
                "research_speedup_vs_pytorch_research": [k / ratio for k in PYTORCH_RESEARCH_OVER_PLAIN],
            })
    print(json.dumps({"benchmark": "vs_torch", "backend": jax.default_backend(), "threads": args.threads,
                      "torch_version": torch.__version__, "jax_version": jax.__version__,
                      "rounds": args.rounds, "steps_per_round": args.steps, "settle_steps": args.settle, "results": results,
                      "target_ratio_max": 1.0}))
    assert math.isfinite(results[next(iter(results))]["jax_over_torch_median_ratio"])


if __name__ == "__main__":
    from altgrad_jax.hugepages import restart_with_hugepages

    restart_with_hugepages()  # as the command line runs: malloc's large blocks on huge pages
    main()
