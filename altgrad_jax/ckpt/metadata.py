"""The JSON saved beside a state's arrays, and the checks a restore makes with it.

It holds the caller's keys plus `step`, `val_loss`, the library `versions`, the `prng_keys`
implementation of every typed key and `state_leaves` ({leaf name: [shape, dtype]}), so that a
restore can refuse a target of another shape before reading any array.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import platform
import warnings

import jax

from altgrad_jax.ckpt.errors import CheckpointError, CheckpointMismatchError, CheckpointVersionWarning
from altgrad_jax.ckpt.safetensors_handler import dtype_name, is_typed_key, named_leaves

# Keys this module adds to the caller's metadata dict.
RESERVED_METADATA_KEYS = ("versions", "prng_keys", "state_leaves", "val_loss", "step")
_VERSIONED_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "safetensors", "numpy")


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    versions = {name: importlib.metadata.version(name) for name in _VERSIONED_DISTRIBUTIONS}
    versions["python"] = platform.python_version()
    return tuple(versions.items())


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide how a state is computed and stored."""
    return dict(_installed_versions())


def leaf_signatures(tree) -> dict[str, list]:
    """{leaf name: [shape, dtype name]} for arrays, ShapeDtypeStructs or scalars."""
    signatures = {}
    for name, _, leaf in named_leaves(tree):
        dtype = getattr(leaf, "dtype", None)
        signatures[name] = [list(getattr(leaf, "shape", ())), dtype_name(dtype) if dtype is not None else type(leaf).__name__]
    return signatures


def finite_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def build_metadata(state, step: int, metadata: dict | None, val_loss=None) -> dict:
    """The caller's dict plus versions, PRNG key implementations and leaf signatures."""
    user = dict(metadata or {})
    clashes = sorted(set(user) & set(RESERVED_METADATA_KEYS))
    if clashes:
        raise CheckpointError(f"metadata keys {clashes} are reserved by the checkpoint module")
    result = {
        **user,
        "step": int(step),
        "val_loss": finite_or_none(val_loss),
        "versions": library_versions(),
        "prng_keys": {name: str(jax.random.key_impl(leaf)) for name, _, leaf in named_leaves(state) if is_typed_key(leaf)},
        "state_leaves": leaf_signatures(state),
    }
    try:
        json.dumps(result)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"metadata for step {step} is not JSON-serializable: {error}") from None
    return result


def check_target(saved: dict, target, where: str) -> None:
    """Raise CheckpointMismatchError when `target` does not match the saved leaves."""
    saved_leaves = saved["state_leaves"]
    target_leaves = leaf_signatures(target)
    missing = [name for name in saved_leaves if name not in target_leaves]
    extra = [name for name in target_leaves if name not in saved_leaves]
    def in_quant_state(names, leaf):
        return any(name.startswith("quant_state.") and name.endswith(leaf) for name in names)

    if in_quant_state(missing, ".scale") and in_quant_state(extra, ".amax_history"):
        raise CheckpointMismatchError(
            f"{where}: written by an altgrad_jax before the three-slot FP8 recipe (its quant_state "
            "holds one weight scale per layer, not x/w/dy amax histories); start a fresh run")
    if missing or extra:
        raise CheckpointMismatchError(
            f"{where}: the target's structure differs from the saved state "
            f"(only in checkpoint: {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            f"only in target: {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for name, (shape, dtype) in saved_leaves.items():
        target_shape, target_dtype = target_leaves[name]
        if shape != target_shape or dtype != target_dtype:
            raise CheckpointMismatchError(
                f"{where}: leaf '{name}' is {tuple(shape)} {dtype} in the checkpoint but "
                f"{tuple(target_shape)} {target_dtype} in the target (did the config change?)"
            )


def warn_on_version_change(saved: dict, where: str) -> None:
    saved_versions = saved.get("versions", {})
    changed = [
        f"{name} {saved_versions.get(name)} -> {version}"
        for name, version in library_versions().items()
        if saved_versions.get(name) != version
    ]
    if changed:
        warnings.warn(
            f"{where} was written with other library versions: {', '.join(changed)}",
            CheckpointVersionWarning,
            stacklevel=3,
        )
