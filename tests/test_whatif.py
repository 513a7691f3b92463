"""What-if shadowing: every candidate format's statistics for the run's real tensors, one
program for every step, and the run's own numbers back when the candidate is the run's format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax.config import ConfigError, TrainConfig
from altgrad_jax.quant import FORMATS
from altgrad_jax.quant.counts import STATS, tensor_stats
from altgrad_jax.quant.rounding import reciprocal, round_to_format
from altgrad_jax.quant.scaling import scale_from_amax
from altgrad_jax.quant.whatif import whatif_stats
from altgrad_jax.train_state import init_train_state
from altgrad_jax.train_step import make_train_step

BASE = TrainConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=48, batch_size=4, use_fp8=True,
                   learning_rate=3e-3, warmup_steps=0, max_steps=20, whatif_interval=2)


def _batch(seed):
    x = np.random.default_rng(seed).integers(0, BASE.vocab_size, (BASE.batch_size, BASE.block_size + 1))
    return jnp.asarray(x[:, :-1], jnp.int32), jnp.asarray(x[:, 1:], jnp.int32)


@pytest.mark.parametrize("name", [*FORMATS])
def test_stacked_candidates_round_like_the_run(name):
    rng = np.random.default_rng(0)
    t = jnp.asarray(rng.standard_normal(4096).astype(np.float32) * np.exp2(rng.uniform(-20, 4, 4096)).astype(np.float32))
    stats = whatif_stats(t, tuple(FORMATS) + ("bfloat16",), "current", 0.0, 1.05)
    own_index = list(FORMATS).index(name)
    scale = scale_from_amax(jnp.max(jnp.abs(t)), 1.0, name, 1.05)
    rounded = round_to_format(t * reciprocal(scale), name) * scale
    expected = dict(zip(STATS, np.asarray(tensor_stats(t, rounded, name, scale, False))))
    got = dict(zip(STATS, np.asarray(stats[own_index])))
    for key in ("overflow", "underflow", "nonzero", "elements", "amax"):
        assert got[key] == expected[key], key
    assert got["err_sq"] / got["norm_sq"] == pytest.approx(expected["err_sq"] / expected["norm_sq"], rel=1e-4)
    bf16 = np.asarray(stats[-1])
    exact = np.asarray(t).astype(jnp.bfloat16).astype(np.float32)
    assert bf16[1] == np.sum((np.asarray(t) != 0) & (exact == 0)) and bf16[0] == 0


@pytest.mark.parametrize("settings", [dict(fp8_format="E4M3"), dict(fp8_format="E2M5", fp8_scaling="current"),
                                      dict(fp8_forward_format="E4M3", fp8_backward_format="E5M2",
                                           fp8_scaling={"x": "none"})], ids=["e4m3", "e2m5-current", "hybrid"])
def test_candidate_equal_to_the_run_format_gives_the_runs_own_numbers(settings):
    config = BASE.replace(**settings)
    step, state = make_train_step(config), init_train_state(config)
    checked = 0
    for index in range(4):
        state, metrics = step(state, _batch(index))
        if (index + 1) % config.whatif_interval:  # logged step index + 1
            assert all(float(v) == 0.0 for k, v in metrics.items() if k.startswith("whatif/"))
            continue
        for name, value in metrics.items():
            if not name.startswith("quant/") or name.startswith("quant/bit_stall"):
                continue
            _, kind, role, layer = name.split("/", 3)
            run_format = {"x": config.fp8_forward_format, "w": config.fp8_forward_format,
                          "dy": config.fp8_backward_format}[role] or config.fp8_format
            shadow = float(metrics[f"whatif/{run_format}/{role}/{kind}/{layer}"])
            assert shadow == pytest.approx(float(value), rel=1e-4, abs=0 if kind != "rel_err" else 1e-7), name
            checked += 1
    assert checked >= 2 * 5 * 9  # two active steps, five layers, three roles x three kinds
    assert step._cache_size() == 1  # one program for active and skipped steps


def test_coarser_candidates_lose_more_and_every_candidate_is_logged():
    config = BASE.replace(fp8_format="E5M2", whatif_interval=1)
    _, metrics = make_train_step(config)(init_train_state(config), _batch(0))
    layer = "h/0/mlp/c_fc"
    for candidate in config.whatif_formats:
        for role in ("x", "w", "dy"):
            for kind in ("underflow", "overflow", "rel_err"):
                assert np.isfinite(float(metrics[f"whatif/{candidate}/{role}/{kind}/{layer}"]))
    rel = {c: float(metrics[f"whatif/{c}/x/rel_err/{layer}"]) for c in config.whatif_formats}
    assert rel["bfloat16"] < rel["E3M4"] < rel["E4M3"] < rel["E5M2"] < rel["E7M0"]


def test_bad_whatif_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="whatif_formats: unknown format 'E9M0'"):
        TrainConfig(whatif_formats=["E4M3", "E9M0"])
    with pytest.raises(ConfigError, match="named twice"):
        TrainConfig(whatif_formats=["E4M3", "e4m3"])
    with pytest.raises(ConfigError, match="whatif_interval: must be >= 0"):
        TrainConfig(whatif_interval=-1)
