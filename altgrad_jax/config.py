"""Training configuration: frozen dataclasses, loaded from YAML and validated on every change.

Each field is declared once, `name: type = setting(default, doc, rule)`: the doc says what it
means, the rule how a value is read (type, canonical form) and the range or choices it must lie
in. The checks that tie fields together are in `_check_across_fields`. Validation lives in
`__post_init__`, so every way of building a config (constructor, YAML file, `key=value`
overrides, `replace`) goes through the same checks. A bad value raises `ConfigError` with one
line that names the field (or the file) and the problem.
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


# ---------------------------------------------------------------------------------------------
# Reading one value: each reader returns the canonical value or raises a one-line ConfigError


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _section_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["rule"].section is not None)


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


def _as_section(name: str, value: object, cls):
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise _type_error(name, f"a mapping ({name} section)", value)
    _check_keys(value, _field_names(cls), prefix=f"{name}.")
    return cls(**value)


# ---------------------------------------------------------------------------------------------
# Fields: each is declared once, with its default, its documentation and its rule


@dataclass(frozen=True)
class Rule:
    """How a field's value is read (type and canonical form; a wrong type raises ConfigError) and,
    optionally, the range it must then lie in: a predicate and the words that describe it."""

    read: Callable[[str, object], Any]
    within: tuple[Callable[[Any], bool], str] | None = None
    section: type | None = None  # a nested dataclass, read from a mapping (mesh)

    def check_range(self, name: str, value: object) -> None:
        if self.within is not None and value is not None and not self.within[0](value):
            raise ConfigError(f"{name}: must be {self.within[1]}, got {value!r}")


def setting(default, doc: str, rule: Rule):
    """A config field: its default, what it means (`doc`) and how it is validated (`rule`)."""
    metadata = {"doc": doc, "rule": rule}
    if isinstance(default, dict):  # mutable: every config gets its own copy
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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


def integer(low=None, high=None, **open_ends) -> Rule:
    """An int (whole floats and numeric strings accepted), optionally in [low, high]."""
    return Rule(_as_int, None if low is None and high is None else _interval(low, high, **open_ends))


def number(low=None, high=None, **open_ends) -> Rule:
    """A finite float (ints and numeric strings accepted), optionally in [low, high]."""
    return Rule(_as_float, None if low is None and high is None else _interval(low, high, **open_ends))


def one_of(choices: tuple[str, ...]) -> Rule:
    """One of `choices`, any case."""
    return Rule(lambda name, value: _as_choice(name, value, choices))


def per_slot(choices: tuple[str, ...]) -> Rule:
    """One of `choices` for every slot, or a mapping {x: .., w: .., dy: ..} (left out: the first)."""
    return Rule(lambda name, value: _as_slot_choice(name, value, choices))


def optional(rule: Rule) -> Rule:
    """None, or a value of `rule`."""
    return Rule(lambda name, value: None if value is None else rule.read(name, value), rule.within)


def section(cls) -> Rule:
    """A nested dataclass of fields, given as a mapping (`mesh: {data_parallel: 2}`)."""
    return Rule(lambda name, value: _as_section(name, value, cls), section=cls)


def _validate_fields(config, prefix: str) -> None:
    """Reads every field with its rule (types first, so a wrong type anywhere is reported before a
    value out of range), then checks the ranges; fields in declaration order."""
    fields = dataclasses.fields(config)
    for f in fields:
        value = f.metadata["rule"].read(prefix + f.name, getattr(config, f.name))
        object.__setattr__(config, f.name, value)  # frozen: only here, before anyone sees it
    for f in fields:
        f.metadata["rule"].check_range(prefix + f.name, getattr(config, f.name))


FLAG = Rule(_as_bool)
TEXT = Rule(_as_str)  # a non-blank string
FORMAT = Rule(_as_format)
STORAGE = Rule(_as_storage)
AT_LEAST_ONE = integer(1)
AT_LEAST_ZERO = integer(0)
FRACTION = number(0, 1)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh for data parallelism."""

    data_parallel: int = setting(
        -1, "Devices along the data axis: -1 = all devices; otherwise a positive count that must divide "
        "the device count (checked at run time, since the config does not know the machine).",
        Rule(_as_int, (lambda value: value == -1 or value >= 1, "-1 (all devices) or >= 1")))

    def __post_init__(self):
        _validate_fields(self, prefix="mesh.")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a run needs; see configs/default.yaml for a documented example. Each field's
    `setting` gives its default, what it means and the values it accepts."""

    # --- model (nanoGPT) ---
    n_layer: int = setting(6, "transformer blocks", AT_LEAST_ONE)
    n_head: int = setting(6, "attention heads per block; must divide n_embd", AT_LEAST_ONE)
    n_embd: int = setting(384, "residual stream width", AT_LEAST_ONE)
    block_size: int = setting(256, "context length in tokens", AT_LEAST_ONE)
    vocab_size: int = setting(256, "token ids are in [0, vocab_size)", AT_LEAST_ONE)
    dropout: float = setting(0.0, "dropout probability", number(0, 1, high_open=True))

    # --- training ---
    batch_size: int = setting(64, "sequences per step (global, across data-parallel devices)", AT_LEAST_ONE)
    learning_rate: float = setting(3e-4, "peak learning rate after warm-up", number(0, low_open=True))
    min_lr_ratio: float = setting(0.1, "cosine decay ends at learning_rate * min_lr_ratio", FRACTION)
    max_steps: int = setting(5000, "optimizer steps in the run", AT_LEAST_ONE)
    warmup_steps: int = setting(100, "linear warm-up steps; at most max_steps", AT_LEAST_ZERO)
    grad_clip: float = setting(1.0, "global-norm gradient clipping; 0 disables it", number(0))
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay", number(0))
    beta1: float = setting(0.9, "AdamW first-moment decay", number(0, 1, high_open=True))
    beta2: float = setting(0.95, "AdamW second-moment decay", number(0, 1, high_open=True))

    # --- quantization (simulated 8-bit floats) ---
    use_fp8: bool = setting(False, "quantize the linear layers; False = plain float32 training", FLAG)
    fp8_format: str = setting("E5M2", "default format name (a key of altgrad_jax.quant.FORMATS)", FORMAT)
    fp8_forward_format: str | None = setting(
        None, "x and w slots (activations, weights); None -> fp8_format", optional(FORMAT))
    fp8_backward_format: str | None = setting(
        None, "dy slot (gradient at a layer's output); None -> fp8_format", optional(FORMAT))
    fp8_scaling: str | dict[str, str] = setting(
        "delayed", "Per slot scaling: delayed (amax history of earlier steps), current (the tensor's "
        "own amax) or none (scale 1); one value for x, w and dy, or a mapping {x: .., w: .., dy: ..}.",
        per_slot(SCALINGS))
    fp8_rounding: str | dict[str, str] = setting(
        "nearest", "Per slot rounding: nearest (ties to even) or stochastic; one value or a slot mapping.",
        per_slot(ROUNDINGS))
    fp8_layer_rules: tuple[dict, ...] = setting(
        (), "Ordered layer rules, first match wins: {match: glob on the layer name, then any of format "
        "(all slots), forward (x, w), backward (dy), x, w, dy (a format or FP32), scaling, rounding "
        "(one value or a slot mapping)}, e.g. [{match: lm_head, format: FP32}].",
        Rule(_as_layer_rules))
    fp8_layer_formats: dict[str, str] = setting(
        {}, "Older shorthand: fnmatch pattern -> format or FP32 for all three slots; consulted when no "
        "fp8_layer_rules entry matches.", Rule(_as_layer_formats))
    quantize_activations: bool = setting(True, "false: the x slot stays float32 in every layer", FLAG)
    quantize_gradients: bool = setting(True, "false: the dy slot stays float32 in every layer", FLAG)
    use_shadow: bool = setting(False, "also compute float32 gradients each step and compare them", FLAG)
    amax_history_len: int = setting(16, "steps of |x| maxima kept for delayed scaling", AT_LEAST_ONE)
    fp8_amax_margin: float = setting(1.05, "scale uses margin * max(history); >= 1 leaves headroom", number(1))
    fp8_hardware_gemm: bool = setting(False, "real float8 dot (Hopper GPUs) instead of simulation", FLAG)
    whatif_interval: int = setting(
        0, "What-if shadowing: every this many steps (0 = off) each quantized operand is also rounded "
        "to every candidate of whatif_formats, logged as "
        "whatif/<candidate>/<role>/{underflow,overflow,rel_err}/<layer>", AT_LEAST_ZERO)
    whatif_formats: tuple[str, ...] = setting(
        WHATIF_DEFAULT, "what-if candidates: FORMATS names and/or bfloat16", Rule(_as_whatif_formats))

    # --- the weight update (where low-precision storage loses updates) ---
    master_weights: str = setting(
        "float32", "How the params are stored between steps: float32, bfloat16, or a format name (values "
        "on its grid at a power-of-two per-tensor scale, kept as that format's codes); no float32 copy.",
        STORAGE)
    update_rounding: str = setting(
        "nearest", "rounding of the updated weight to master_weights: nearest or stochastic", one_of(ROUNDINGS))
    kahan: bool = setting(
        False, "carry what that rounding dropped into the next update (float32 buffer)", FLAG)
    opt_state_dtype: str = setting(
        "float32", "Adam moments between steps: float32, bfloat16 or a format name", STORAGE)
    update_rule: str = setting(
        "adamw", "adamw; ulp (learning_rate counts ULPs of the stored weight per step); preconditioned "
        "(the earlier bench's AdamW on gradients times the weight's ULP)", one_of(UPDATE_RULES))

    # --- checkpointing ---
    checkpoint_interval: int = setting(100, "save every this many steps", AT_LEAST_ONE)
    checkpoint_dir: str | None = setting(None, "None -> <out_dir>/checkpoints", optional(TEXT))
    max_checkpoints: int = setting(3, "most recent checkpoints kept", AT_LEAST_ONE)

    # --- stability monitoring ---
    nan_patience: int = setting(10, "consecutive non-finite losses before the run stops", AT_LEAST_ONE)
    bit_stall_threshold: float = setting(
        0.5, "alert when update/norm_ratio < 1 - this (narrow master_weights)", FRACTION)
    overflow_threshold: float = setting(0.01, "alert when this fraction of values saturates", FRACTION)
    dead_neuron_threshold: float = setting(1e-8, "|gradient| below this counts as dead", number(0))
    dead_neuron_window: int = setting(100, "steps a dead fraction must persist before alerting", AT_LEAST_ONE)
    alert_wait_seconds: float = setting(300.0, "minimum seconds between repeats of one alert", number(0))

    # --- logging and evaluation ---
    log_interval: int = setting(1, "log metrics every this many steps", AT_LEAST_ONE)
    eval_interval: int = setting(100, "evaluate on the validation split every this many steps", AT_LEAST_ONE)
    eval_iters: int = setting(10, "validation batches per evaluation", AT_LEAST_ONE)

    # --- Weights & Biases ---
    project: str = setting("altgrad", 'W&B project name; "" switches W&B off', Rule(_as_any_str))
    run_name: str | None = setting(None, "W&B run name; None lets W&B choose", optional(TEXT))
    tags: tuple[str, ...] = setting((), "W&B tags (a YAML list of strings)", Rule(_as_str_tuple))
    wandb_mode: str | None = setting(
        None, 'None = auto (online with an API key, else offline), or "online", "offline", "disabled"',
        Rule(_as_wandb_mode))

    # --- run ---
    data: str = setting("pystdlib", "dataset spec passed to altgrad_jax.data.load_dataset", TEXT)
    out_dir: str = setting("runs/default", "run directory: config, metrics, checkpoints", TEXT)
    seed: int = setting(42, "root PRNG seed", integer(0, 2**32, high_open=True))

    # --- devices ---
    mesh: MeshConfig = setting(MeshConfig(), "see MeshConfig", section(MeshConfig))

    def __post_init__(self):
        _validate_fields(self, prefix="")
        _check_across_fields(self)

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
# Checks across fields


def _check_across_fields(config: TrainConfig) -> None:
    """The rules that tie two or more fields together."""
    if config.n_embd % config.n_head:
        raise ConfigError(f"n_embd: must be divisible by n_head={config.n_head}, "
                          f"got {config.n_embd}")
    if config.master_weights == "float32" and (config.kahan or config.update_rounding != "nearest"):
        raise ConfigError("kahan / update_rounding: only act on narrow master_weights "
                          "(bfloat16 or a format); with float32 the update is not rounded")
    if config.warmup_steps > config.max_steps:
        raise ConfigError(f"warmup_steps: must be <= max_steps={config.max_steps}, "
                          f"got {config.warmup_steps}")


# ---------------------------------------------------------------------------------------------
# Loading, saving and overrides


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build a validated TrainConfig from a mapping such as a parsed YAML file."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(data).__name__}")
    _check_keys(data, _field_names(TrainConfig), prefix="")
    return TrainConfig(**data)


def read_config_mapping(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML config file, not yet validated as a config (a caller may take
    its own sections out first). Duplicate keys are refused; errors are one line naming the file."""
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
    return data


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a YAML config file; errors name the file and the field."""
    data = read_config_mapping(path)
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{os.fspath(path)}: {error}") from None


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
