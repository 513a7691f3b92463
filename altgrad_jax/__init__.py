"""altgrad_jax: a JAX/Flax test bench for 8-bit floating-point transformer training.

Names are resolved lazily (PEP 562) so that `import altgrad_jax` stays cheap and
optional pieces (W&B, matplotlib) are imported only when used.
"""

from importlib import import_module

from altgrad_jax.xla_defaults import apply_default_xla_flags

apply_default_xla_flags()

_EXPORTS = {
    # config
    "TrainConfig": "config",
    "MeshConfig": "config",
    "ConfigError": "config",
    "load_config": "config",
    "save_config": "config",
    "apply_overrides": "config",
    # formats and quantization
    "FORMATS": "quant",
    "FloatFormat": "quant",
    "get_format": "quant",
    "quantize": "quant",
    "quantized_matmul": "quant",
    # metrics
    "compute_gradient_stats": "metrics",
    "compute_stability_metrics": "metrics",
    "gradient_cosine_similarity": "metrics",
    # model and training
    "GPT": "model",
    "TrainState": "train_state",
    "init_train_state": "train_state",
    "make_train_step": "train_step",
    "make_eval_step": "train_step",
    # checkpoints
    "CheckpointManager": "ckpt.manager",
    "CheckpointError": "ckpt.errors",
    "save_checkpoint": "ckpt.manager",
    "load_checkpoint": "ckpt.manager",
    # the run loop
    "train": "loop.trainer",
    "LocalTracker": "loop.local_tracker",
    "WandbTracker": "loop.wandb_tracker",
    "AlertMonitor": "loop.alerts",
    "check_alerts": "loop.alerts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'altgrad_jax' has no attribute {name!r}")
    value = getattr(import_module(f"altgrad_jax.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
