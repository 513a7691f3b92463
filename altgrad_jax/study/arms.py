"""The arms of a sweep and the study config that names them.

An arm is a format name (every slot in that format), `FP32` (use_fp8 false) or a recipe: a named
mapping of config overrides under the study config's top-level `recipes` key. TrainConfig
refuses unknown keys, so `recipes` is read and removed here and the rest goes through
altgrad_jax.config. Each run's config is, in order of precedence: the arm, the sweep's --set,
the file; then the sweep's own out_dir, seed and (when left null) run_name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from altgrad_jax.config import (UNQUANTIZED, ConfigError, TrainConfig, apply_overrides, config_from_dict,
                                read_config_mapping)
from altgrad_jax.quant.formats import FORMATS

RECIPES_KEY = "recipes"
FP32 = UNQUANTIZED
SWEEP_OWNED = ("out_dir", "checkpoint_dir")  # one directory per run: the sweep decides them
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class SweepError(ValueError):
    """Bad sweep input (arm, recipe, path, option): one line on stderr, exit 2."""


@dataclass(frozen=True)
class Arm:
    """One arm: its directory name and the config overrides that make it."""

    name: str
    overrides: Mapping[str, Any]
    kind: str  # "format", "fp32" or "recipe"


def load_study_config(path: str | Path) -> tuple[TrainConfig, dict[str, dict]]:
    """(base config, recipes) from a YAML file whose optional `recipes` key maps names to
    mappings of config overrides; everything else must be a valid TrainConfig."""
    path = Path(path)
    try:
        data = read_config_mapping(path)
    except ConfigError as error:
        raise SweepError(str(error)) from None
    recipes = data.pop(RECIPES_KEY, None) or {}
    if not isinstance(recipes, dict):
        raise SweepError(f"{path}: {RECIPES_KEY} must map recipe names to mappings of config keys")
    reserved = {name.upper() for name in FORMATS} | {FP32}
    for name, overrides in recipes.items():
        if not isinstance(name, str) or not _ARM_NAME.fullmatch(name):
            raise SweepError(f"{path}: recipe name {name!r} must be letters, digits, _ . + - "
                             "(it names a directory)")
        if name.upper() in reserved:
            raise SweepError(f"{path}: recipe {name!r} has the name of a format or FP32")
        if not isinstance(overrides, dict):
            raise SweepError(f"{path}: recipe {name!r} must be a mapping of config keys")
        owned = [key for key in (*SWEEP_OWNED, "seed") if key in overrides]
        if owned:
            raise SweepError(f"{path}: recipe {name!r} sets {owned[0]}, which the sweep sets per run")
    try:
        base = config_from_dict(data)
    except ConfigError as error:
        raise SweepError(f"{path}: {error}") from None
    return base, recipes


def parse_arms(text: str, recipes: Mapping[str, Mapping]) -> list[Arm]:
    """Arms from a comma-separated list: format names (any case), FP32, recipe names."""
    names = [name.strip() for name in text.split(",")]
    if not any(names) or not all(names):
        raise SweepError(f"--formats {text!r}: expected a comma-separated list of arms")
    formats = {name.upper(): name for name in FORMATS}
    by_upper = {name.upper(): name for name in recipes}
    arms = []
    for name in names:
        if name.upper() in formats:
            fmt = formats[name.upper()]
            arms.append(Arm(fmt, {"use_fp8": True, "fp8_format": fmt, "fp8_forward_format": None,
                                  "fp8_backward_format": None}, "format"))
        elif name.upper() == FP32:
            arms.append(Arm(FP32, {"use_fp8": False}, "fp32"))
        elif name in recipes or name.upper() in by_upper:
            recipe = name if name in recipes else by_upper[name.upper()]
            arms.append(Arm(recipe, dict(recipes[recipe]), "recipe"))
        else:
            known = ", ".join([*FORMATS, FP32, *recipes])
            raise SweepError(f"unknown arm {name!r} (formats, FP32 and the config's recipes: {known})")
    seen = set()
    for arm in arms:
        if arm.name in seen:
            raise SweepError(f"--formats: arm {arm.name} is listed twice")
        seen.add(arm.name)
    return arms


def sweep_base(base: TrainConfig, sets: list[str]) -> TrainConfig:
    """The file's config with the sweep's --set overrides (out_dir and checkpoint_dir refused)."""
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in SWEEP_OWNED:
            raise SweepError(f"--set {key}: the sweep gives each run its own directory (use --out)")
    try:
        config = apply_overrides(base, sets)
    except ConfigError as error:
        raise SweepError(f"--set: {error}") from None
    if config.checkpoint_dir is not None:
        raise SweepError("checkpoint_dir must be null in a sweep: each run keeps its checkpoints "
                         "in its own directory")
    return config


def run_config(base: TrainConfig, arm: Arm, seed: int, run_dir: str | Path) -> TrainConfig:
    """The config of one run: `base` (file + --set) with the arm's overrides, seed and directory."""
    try:
        config = base.replace(**arm.overrides)
    except ConfigError as error:
        raise SweepError(f"arm {arm.name}: {error}") from None
    changes: dict[str, Any] = {"out_dir": str(run_dir), "seed": seed}
    if config.run_name is None:
        changes["run_name"] = f"{arm.name}-seed{seed}"
    return config.replace(**changes)
