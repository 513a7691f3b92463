"""Training configuration: frozen dataclasses, loaded from YAML and validated on every change.

Validation lives in `__post_init__`, so every way of building a config (constructor, YAML file,
`key=value` overrides, `replace`) goes through the same checks. A bad value raises `ConfigError`
with one line that names the field (or the file) and the problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from altgrad_jax.quant.formats import FORMATS
from altgrad_jax.quant.rounding import ROUNDINGS
from altgrad_jax.quant.scaling import SCALINGS, SLOTS


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message is one line naming it."""


UNQUANTIZED = "FP32"  # canonical layer format meaning "keep this layer in float32"
_UNQUANTIZED_ALIASES = ("fp32", "none")
WANDB_MODES = ("online", "offline", "disabled")
UPDATE_RULES = ("adamw", "ulp", "preconditioned")
WHATIF_DEFAULT = (*FORMATS, "bfloat16")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh for data parallelism."""

    # Devices along the data axis: -1 = all devices; otherwise a positive count that must divide
    # the device count (checked at run time, since the config does not know the machine).
    data_parallel: int = -1

    def __post_init__(self):
        _coerce_fields(self, prefix="mesh.")
        if self.data_parallel != -1 and self.data_parallel < 1:
            raise ConfigError(
                f"mesh.data_parallel: must be -1 (all devices) or >= 1, got {self.data_parallel!r}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a run needs; see configs/default.yaml for a documented example."""

    # --- model (nanoGPT) ---
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block; must divide n_embd
    n_embd: int = 384  # residual stream width
    block_size: int = 256  # context length in tokens
    vocab_size: int = 256  # token ids are in [0, vocab_size)
    dropout: float = 0.0  # dropout probability in [0, 1)

    # --- training ---
    batch_size: int = 64  # sequences per step (global, across data-parallel devices)
    learning_rate: float = 3e-4  # peak learning rate after warm-up
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio, in [0, 1]
    max_steps: int = 5000  # optimizer steps in the run
    warmup_steps: int = 100  # linear warm-up steps, 0 <= warmup_steps <= max_steps
    grad_clip: float = 1.0  # global-norm gradient clipping; 0 disables it
    weight_decay: float = 0.1  # AdamW decoupled weight decay, >= 0
    beta1: float = 0.9  # AdamW first-moment decay, in [0, 1)
    beta2: float = 0.95  # AdamW second-moment decay, in [0, 1)

    # --- quantization (simulated 8-bit floats) ---
    use_fp8: bool = False  # quantize the linear layers; False = plain float32 training
    fp8_format: str = "E5M2"  # default format name (a key of altgrad_jax.quant.FORMATS)
    fp8_forward_format: str | None = None  # x and w slots (activations, weights); None -> fp8_format
    fp8_backward_format: str | None = None  # dy slot (gradient at a layer's output); None -> fp8_format
    # Per slot scaling: delayed (amax history of earlier steps), current (the tensor's own amax)
    # or none (scale 1); one value for x, w and dy, or a mapping {x: .., w: .., dy: ..}.
    fp8_scaling: str | dict[str, str] = "delayed"
    # Per slot rounding: nearest (ties to even) or stochastic; one value or a slot mapping.
    fp8_rounding: str | dict[str, str] = "nearest"
    # Ordered layer rules, first match wins: {match: glob on the layer name, then any of format
    # (all slots), forward (x, w), backward (dy), x, w, dy (a format or FP32), scaling, rounding
    # (one value or a slot mapping)}, e.g. [{match: lm_head, format: FP32}].
    fp8_layer_rules: tuple[dict, ...] = ()
    # Older shorthand: fnmatch pattern -> format or "FP32" for all three slots; consulted when no
    # fp8_layer_rules entry matches.
    fp8_layer_formats: dict[str, str] = field(default_factory=dict)
    quantize_activations: bool = True  # false: the x slot stays float32 in every layer
    quantize_gradients: bool = True  # false: the dy slot stays float32 in every layer
    use_shadow: bool = False  # also compute float32 gradients each step and compare them
    amax_history_len: int = 16  # steps of |x| maxima kept for delayed scaling, >= 1
    fp8_amax_margin: float = 1.05  # scale uses margin * max(history); >= 1 leaves headroom
    fp8_hardware_gemm: bool = False  # real float8 dot (Hopper GPUs) instead of simulation
    # What-if shadowing: every this many steps (0 = off) each quantized operand is also rounded
    # to every candidate below, logged as whatif/<candidate>/<role>/{underflow,overflow,rel_err}/<layer>
    whatif_interval: int = 0
    whatif_formats: tuple[str, ...] = WHATIF_DEFAULT  # FORMATS names and/or bfloat16

    # --- the weight update (where low-precision storage loses updates) ---
    # How the params are stored between steps: float32, bfloat16, or a format name (values on its
    # grid at a power-of-two per-tensor scale, kept as that format's codes); no float32 copy.
    master_weights: str = "float32"
    update_rounding: str = "nearest"  # rounding of the updated weight to master_weights: or stochastic
    kahan: bool = False  # carry what that rounding dropped into the next update (float32 buffer)
    opt_state_dtype: str = "float32"  # Adam moments between steps: float32, bfloat16 or a format name
    # adamw; ulp (learning_rate counts ULPs of the stored weight per step); preconditioned (the
    # earlier bench's AdamW on gradients times the weight's ULP)
    update_rule: str = "adamw"

    # --- checkpointing ---
    checkpoint_interval: int = 100  # save every this many steps
    checkpoint_dir: str | None = None  # None -> <out_dir>/checkpoints
    max_checkpoints: int = 3  # most recent checkpoints kept

    # --- stability monitoring ---
    nan_patience: int = 10  # consecutive non-finite losses before the run stops, >= 1
    bit_stall_threshold: float = 0.5  # alert when update/norm_ratio < 1 - this (narrow master_weights)
    overflow_threshold: float = 0.01  # alert when this fraction of values saturates
    dead_neuron_threshold: float = 1e-8  # |gradient| below this counts as dead, >= 0
    dead_neuron_window: int = 100  # steps a dead fraction must persist before alerting
    alert_wait_seconds: float = 300.0  # minimum seconds between repeats of one alert

    # --- logging and evaluation ---
    log_interval: int = 1  # log metrics every this many steps
    eval_interval: int = 100  # evaluate on the validation split every this many steps
    eval_iters: int = 10  # validation batches per evaluation

    # --- Weights & Biases ---
    project: str = "altgrad"  # W&B project name; "" switches W&B off
    run_name: str | None = None  # W&B run name; None lets W&B choose
    tags: tuple[str, ...] = ()  # W&B tags (a YAML list of strings)
    wandb_mode: str | None = None  # None = auto (online with an API key, else offline), or
    #                                "online", "offline", "disabled"

    # --- run ---
    data: str = "pystdlib"  # dataset spec passed to altgrad_jax.data.load_dataset
    out_dir: str = "runs/default"  # run directory: config, metrics, checkpoints
    seed: int = 42  # root PRNG seed, in [0, 2**32)

    # --- devices ---
    mesh: MeshConfig = field(default_factory=MeshConfig)  # see MeshConfig

    def __post_init__(self):
        _coerce_fields(self, prefix="")
        _check_ranges(self)

    @property
    def checkpoint_path(self) -> str:
        """The checkpoint directory: checkpoint_dir, or <out_dir>/checkpoints."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        return os.path.join(self.out_dir, "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (lists, dicts, scalars) that YAML can dump."""
        result = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, MeshConfig):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = [dict(item) if isinstance(item, dict) else item for item in value]
            elif isinstance(value, dict):
                value = dict(value)
            result[f.name] = value
        return result

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed, validated like a loaded config."""
        _check_keys(changes, _field_names(TrainConfig), prefix="")
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Loading, saving and overrides


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build a validated TrainConfig from a mapping such as a parsed YAML file."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(data).__name__}")
    _check_keys(data, _field_names(TrainConfig), prefix="")
    return TrainConfig(**data)


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a YAML config file; errors name the file and the field."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config file ({_one_line(error)})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = error.problem or error.context or "invalid YAML"
        raise ConfigError(f"{path}: YAML error at {where}{_one_line(problem)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: YAML error: {_one_line(error)}") from None
    if data is None:
        raise ConfigError(f"{path}: config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of config keys, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write `config` as YAML such that load_config(path) == config."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"save_config expects a TrainConfig, got {type(config).__name__}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write("# altgrad_jax TrainConfig\n" + text)
    os.replace(temporary, path)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Parse ["key=value", "mesh.data_parallel=2"] into a nested dict; values are YAML.

    Nothing (or only blanks) after "=" is the empty string, as `key: ""` in a YAML file, not None
    (YAML's reading of an empty value): `project=` switches W&B off. A field that must not be
    empty then fails validation with its name (`run_name=`: "run_name: must not be empty");
    `key=null` gives None.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    sections = _section_names()
    result: dict[str, Any] = {}
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {item!r}: expected a 'key=value' string")
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or error
            raise ConfigError(
                f"override {key}: cannot parse value {text!r} as YAML ({_one_line(problem)})"
            ) from None
        section, dot, leaf = key.partition(".")
        if not dot:
            result[key] = value
            continue
        if not leaf or "." in leaf:
            raise ConfigError(f"override {item!r}: expected key=value or section.key=value")
        if section not in sections:
            raise ConfigError(f"override {item!r}: {section!r} is not a config section"
                              f"{_suggestion(section, sections)}")
        if not isinstance(result.get(section, {}), dict):
            result[section] = {}
        result.setdefault(section, {})[leaf] = value
    return result


def apply_overrides(config: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """`config` with `key=value` overrides applied (sections such as mesh are merged)."""
    merged = config.to_dict()
    for key, value in parse_overrides(overrides).items():
        if key in _section_names() and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return config_from_dict(merged)


# ---------------------------------------------------------------------------------------------
# Validation helpers


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _section_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.type == "MeshConfig")


def _suggestion(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(data: Mapping, valid: tuple[str, ...], prefix: str) -> None:
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"config key {prefix}{key!r} is not a string")
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix + key!r}{hint}")


def _type_error(name: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")


def _number_from_text(text: str) -> object:
    for parse in (int, float):
        try:
            return parse(text.strip())
        except ValueError:
            pass
    return text


def _as_int(name: str, value: object) -> int:
    number = _number_from_text(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise _type_error(name, "an integer", value)
    if isinstance(number, numbers.Integral):
        return int(number)
    if not float(number).is_integer():
        raise ConfigError(f"{name}: expected an integer, got {value!r} (not a whole number)")
    return int(number)


def _as_float(name: str, value: object) -> float:
    number = _number_from_text(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise _type_error(name, "a number", value)
    number = float(number)
    if not math.isfinite(number):
        raise ConfigError(f"{name}: must be finite, got {value!r}")
    return number


def _as_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _type_error(name, "true or false", value)
    return value


def _as_str(name: str, value: object) -> str:
    text = _as_any_str(name, value)
    if not text.strip():
        raise ConfigError(f"{name}: must not be empty")
    return text


def _as_any_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _type_error(name, "a string (quote it in YAML)", value)
    return value


def _optional(coerce: Callable[[str, object], Any]) -> Callable[[str, object], Any]:
    return lambda name, value: None if value is None else coerce(name, value)


def _format_names() -> tuple[str, ...]:
    return tuple(FORMATS)


def _as_format(name: str, value: object, *, allow_unquantized: bool = False) -> str:
    text = _as_str(name, value)
    if allow_unquantized and text.strip().lower() in _UNQUANTIZED_ALIASES:
        return UNQUANTIZED
    valid = _format_names()
    by_upper = {format_name.upper(): format_name for format_name in valid}
    found = by_upper.get(text.strip().upper())
    if found is None:
        extra = ", FP32, none" if allow_unquantized else ""
        raise ConfigError(f"{name}: unknown format {text!r} (valid: {', '.join(valid)}{extra})")
    return found


def _as_layer_formats(name: str, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _type_error(name, "a mapping of layer pattern -> format", value)
    result = {}
    for pattern, format_name in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{name}: layer pattern {pattern!r} must be a non-empty string")
        result[pattern] = _as_format(f"{name}[{pattern!r}]", format_name, allow_unquantized=True)
    return result


def _as_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    text = _as_str(name, value).strip().lower()
    if text not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    return text


def _as_storage(name: str, value: object) -> str:
    """float32, bfloat16 (any case, fp32/bf16 too) or a canonical format name."""
    text = _as_str(name, value).strip()
    plain = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}.get(text.lower())
    if plain is not None:
        return plain
    try:
        return _as_format(name, text)
    except ConfigError:
        raise ConfigError(f"{name}: must be float32, bfloat16 or a format ({', '.join(FORMATS)}), "
                          f"got {value!r}") from None


def _as_whatif_formats(name: str, value: object) -> tuple[str, ...]:
    names = _as_str_tuple(name, value)
    if not names:
        raise ConfigError(f"{name}: must name at least one candidate (turn what-if off with whatif_interval: 0)")
    result = tuple("bfloat16" if n.strip().lower() in ("bfloat16", "bf16") else _as_format(name, n) for n in names)
    if len(set(result)) != len(result):
        raise ConfigError(f"{name}: a candidate is named twice, got {list(names)!r}")
    return result


def _as_slot_choice(name: str, value: object, choices: tuple[str, ...], *, fill: bool = True):
    """One of `choices` for every slot, or a mapping of slots (x, w, dy) to one; with `fill`,
    the slots a mapping leaves out get the default (the first choice)."""
    if not isinstance(value, Mapping):
        return _as_choice(name, value, choices)
    _check_keys(value, SLOTS, prefix=f"{name}.")
    given = {slot: _as_choice(f"{name}.{slot}", value[slot], choices) for slot in SLOTS if slot in value}
    return {slot: given.get(slot, choices[0]) for slot in SLOTS} if fill else given


_RULE_FORMAT_KEYS = {"format": SLOTS, "forward": ("x", "w"), "backward": ("dy",),
                     "x": ("x",), "w": ("w",), "dy": ("dy",)}  # applied in this order
_RULE_KEYS = ("match", *_RULE_FORMAT_KEYS, "scaling", "rounding")


def _as_layer_rule(name: str, rule: object) -> dict:
    """A rule as {match, x?, w?, dy?, scaling?: {slot: ..}, rounding?: {slot: ..}}."""
    if not isinstance(rule, Mapping):
        raise _type_error(name, "a mapping with a 'match' glob and slot settings", rule)
    _check_keys(rule, _RULE_KEYS, prefix=f"{name}.")
    match = rule.get("match")
    if not isinstance(match, str) or not match:
        raise ConfigError(f"{name}.match: must be a non-empty glob on the layer name, got {match!r}")
    result: dict = {"match": match}
    for key, slots in _RULE_FORMAT_KEYS.items():
        if key in rule:
            fmt = _as_format(f"{name}.{key}", rule[key], allow_unquantized=True)
            result.update(dict.fromkeys(slots, fmt))
    for key, choices in (("scaling", SCALINGS), ("rounding", ROUNDINGS)):
        if key in rule:
            value = _as_slot_choice(f"{name}.{key}", rule[key], choices, fill=False)
            result[key] = value if isinstance(value, dict) else dict.fromkeys(SLOTS, value)
    if len(result) == 1:
        raise ConfigError(f"{name}: rule for {match!r} sets nothing (give a format, x, w, dy, scaling or rounding)")
    return {"match": match, **{key: result[key] for key in ("x", "w", "dy", "scaling", "rounding") if key in result}}


def _as_layer_rules(name: str, value: object) -> tuple[dict, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Mapping)) or not isinstance(value, (list, tuple)):
        raise _type_error(name, "a list of rules ({match: glob, ...})", value)
    return tuple(_as_layer_rule(f"{name}[{index}]", rule) for index, rule in enumerate(value))


def _as_str_tuple(name: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _type_error(name, "a list of strings", value)
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{name}: every entry must be a string, got {item!r}")
    return tuple(value)


def _as_wandb_mode(name: str, value: object) -> str | None:
    if value is None:
        return None
    mode = _as_str(name, value).strip().lower()
    if mode not in WANDB_MODES:
        raise ConfigError(f"{name}: must be null or one of {', '.join(WANDB_MODES)}, got {value!r}")
    return mode


def _as_mesh(name: str, value: object) -> MeshConfig:
    if isinstance(value, MeshConfig):
        return value
    if not isinstance(value, Mapping):
        raise _type_error(name, "a mapping (mesh section)", value)
    _check_keys(value, _field_names(MeshConfig), prefix=f"{name}.")
    return MeshConfig(**value)


_COERCE_BY_TYPE: dict[str, Callable[[str, object], Any]] = {
    "int": _as_int,
    "float": _as_float,
    "bool": _as_bool,
    "str": _as_str,
    "str | None": _optional(_as_str),
    "tuple[str, ...]": _as_str_tuple,
    "dict[str, str]": _as_layer_formats,
    "MeshConfig": _as_mesh,
}
_COERCE_BY_NAME: dict[str, Callable[[str, object], Any]] = {
    "fp8_format": _as_format,
    "fp8_forward_format": _optional(_as_format),
    "fp8_backward_format": _optional(_as_format),
    "fp8_scaling": lambda name, value: _as_slot_choice(name, value, SCALINGS),
    "fp8_rounding": lambda name, value: _as_slot_choice(name, value, ROUNDINGS),
    "fp8_layer_rules": lambda name, value: _as_layer_rules(name, value),
    "master_weights": lambda name, value: _as_storage(name, value),
    "opt_state_dtype": lambda name, value: _as_storage(name, value),
    "update_rounding": lambda name, value: _as_choice(name, value, ROUNDINGS),
    "update_rule": lambda name, value: _as_choice(name, value, UPDATE_RULES),
    "whatif_formats": lambda name, value: _as_whatif_formats(name, value),
    "wandb_mode": _as_wandb_mode,
    "project": _as_any_str,  # "" switches W&B off
}


def _coerce_fields(config: object, prefix: str) -> None:
    for f in dataclasses.fields(config):
        coerce = _COERCE_BY_NAME.get(f.name) or _COERCE_BY_TYPE[f.type]
        value = coerce(prefix + f.name, getattr(config, f.name))
        object.__setattr__(config, f.name, value)  # frozen: only here, before anyone sees it


def _interval(low=None, high=None, *, low_open=False, high_open=False):
    """(predicate, description) for a numeric range."""
    def contains(value):
        return ((low is None or (value > low if low_open else value >= low))
                and (high is None or (value < high if high_open else value <= high)))
    if low is not None and high is not None:
        text = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        text = f"{'>' if low_open else '>='} {low}"
    else:
        text = f"{'<' if high_open else '<='} {high}"
    return contains, text


_AT_LEAST_ONE = _interval(1)
_NON_NEGATIVE = _interval(0)
_FRACTION = _interval(0, 1)
_RANGES = {
    "n_layer": _AT_LEAST_ONE, "n_head": _AT_LEAST_ONE, "n_embd": _AT_LEAST_ONE,
    "block_size": _AT_LEAST_ONE, "vocab_size": _AT_LEAST_ONE, "batch_size": _AT_LEAST_ONE,
    "dropout": _interval(0, 1, high_open=True),
    "learning_rate": _interval(0, low_open=True),
    "min_lr_ratio": _FRACTION,
    "max_steps": _AT_LEAST_ONE,
    "warmup_steps": _NON_NEGATIVE,
    "grad_clip": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "beta1": _interval(0, 1, high_open=True), "beta2": _interval(0, 1, high_open=True),
    "amax_history_len": _AT_LEAST_ONE,
    "fp8_amax_margin": _interval(1),
    "checkpoint_interval": _AT_LEAST_ONE, "max_checkpoints": _AT_LEAST_ONE,
    "nan_patience": _AT_LEAST_ONE,
    "bit_stall_threshold": _FRACTION, "overflow_threshold": _FRACTION,
    "dead_neuron_threshold": _NON_NEGATIVE,
    "dead_neuron_window": _AT_LEAST_ONE,
    "alert_wait_seconds": _NON_NEGATIVE,
    "whatif_interval": _NON_NEGATIVE,
    "log_interval": _AT_LEAST_ONE, "eval_interval": _AT_LEAST_ONE, "eval_iters": _AT_LEAST_ONE,
    "seed": _interval(0, 2**32, high_open=True),
}


def _check_ranges(config: TrainConfig) -> None:
    for name, (contains, description) in _RANGES.items():
        value = getattr(config, name)
        if not contains(value):
            raise ConfigError(f"{name}: must be {description}, got {value!r}")
    if config.n_embd % config.n_head:
        raise ConfigError(f"n_embd: must be divisible by n_head={config.n_head}, "
                          f"got {config.n_embd}")
    if config.master_weights == "float32" and (config.kahan or config.update_rounding != "nearest"):
        raise ConfigError("kahan / update_rounding: only act on narrow master_weights "
                          "(bfloat16 or a format); with float32 the update is not rounded")
    if config.warmup_steps > config.max_steps:
        raise ConfigError(f"warmup_steps: must be <= max_steps={config.max_steps}, "
                          f"got {config.warmup_steps}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)
