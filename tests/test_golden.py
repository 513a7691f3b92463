"""Golden numbers: three E5M2 steps of a fixed tiny config, pinned.

If this test fails, the numerics of the step changed. Update the pinned values ONLY when the
change is intended (a new recipe, a fixed bug), and say so in the commit message; otherwise the
change broke something a researcher's comparison between runs depends on.

The steps run in a subprocess under XLA's default flags, the code generation users get, and in
process under the suite's faster-compiling flags (conftest.py), which must not move them either.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax.config import TrainConfig
from altgrad_jax.train_state import init_train_state
from altgrad_jax.train_step import make_train_step

CONFIG = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, batch_size=8,
                     learning_rate=3e-3, warmup_steps=1, max_steps=100, use_fp8=True, fp8_format="E5M2",
                     use_shadow=True, seed=11)
PINNED_AFTER_STEP_3 = {
    "loss": 4.188225746154785,
    "grad_norm": 0.9121741652488708,
    "overflow_rate": 3.5297438444104046e-05,
    "underflow_rate": 0.0,
    "bit_stall_rate": 0.34945914149284363,
    "grad_cos_sim/mean": 0.9941457509994507,
}


def three_steps() -> dict[str, float]:
    step, state = make_train_step(CONFIG), init_train_state(CONFIG)
    for i in range(3):
        tokens = np.random.default_rng(i).integers(0, CONFIG.vocab_size, (8, 17)).astype(np.int32)
        state, metrics = step(state, (jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])))
    return {name: float(metrics[name]) for name in PINNED_AFTER_STEP_3}


def test_three_e5m2_steps_match_the_pinned_metrics():
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "tests.test_golden"], env={**env, "JAX_PLATFORMS": "cpu"},
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.splitlines()[-1])
    for name, pinned in PINNED_AFTER_STEP_3.items():
        assert metrics[name] == pytest.approx(pinned, rel=2e-5, abs=1e-9), (
            f"{name} changed: the step's numerics are not what they were; update PINNED_AFTER_STEP_3 "
            "only if that change is intended (see the module docstring)")


def test_the_suites_compile_flags_give_the_pinned_metrics_too():
    """The flags the rest of the suite runs under do not move these numbers either."""
    metrics = three_steps()
    for name, pinned in PINNED_AFTER_STEP_3.items():
        assert metrics[name] == pytest.approx(pinned, rel=2e-5, abs=1e-9), name


if __name__ == "__main__":
    print(json.dumps(three_steps()))
