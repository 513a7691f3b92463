"""Config: YAML round-trip, validation messages, overrides and per-layer format resolution."""

import dataclasses
import pathlib

import pytest
import yaml

from altgrad_jax.config import (
    ConfigError,
    MeshConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_overrides,
    read_config_mapping,
    save_config,
)

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

NON_DEFAULT = dict(
    n_layer=3, n_head=2, n_embd=64, block_size=32, vocab_size=50304, dropout=0.1,
    batch_size=7, learning_rate=6e-4, min_lr_ratio=0.0, max_steps=20, warmup_steps=20,
    grad_clip=0.0, weight_decay=0.01, beta1=0.8, beta2=0.999,
    use_fp8=True, fp8_format="E4M3", fp8_forward_format="E3M4", fp8_backward_format="E5M2",
    fp8_scaling={"x": "current", "w": "delayed", "dy": "none"}, fp8_rounding="stochastic",
    fp8_layer_rules=[{"match": "h/0/*", "forward": "E4M3", "dy": "FP32", "rounding": {"w": "nearest"}}],
    fp8_layer_formats={"lm_head": "FP32", "h/*/mlp/*": "E2M5"},
    quantize_activations=False, quantize_gradients=True, use_shadow=True,
    amax_history_len=1, fp8_amax_margin=1.0, fp8_hardware_gemm=True,
    whatif_interval=10, whatif_formats=("E2M5", "bfloat16"),
    master_weights="bfloat16", update_rounding="stochastic", kahan=True, opt_state_dtype="E4M3",
    update_rule="ulp",
    checkpoint_interval=5, checkpoint_dir="/tmp/ckpt", max_checkpoints=1,
    nan_patience=1, bit_stall_threshold=1.0, overflow_threshold=0.0,
    dead_neuron_threshold=1e-12, dead_neuron_window=1, alert_wait_seconds=0.5,
    log_interval=2, eval_interval=3, eval_iters=1,
    project="p", run_name="r 1", tags=("a", "b c"), wandb_mode="offline",
    data="tiny", out_dir="runs/x", seed=0, mesh=MeshConfig(data_parallel=4),
)


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- round trip ----------------------------------------------------------------------------

@pytest.mark.parametrize("config", [TrainConfig(), TrainConfig(**NON_DEFAULT)],
                         ids=["default", "non_default"])
def test_yaml_round_trip_is_exact(tmp_path, config):
    path = tmp_path / "sub" / "config.yaml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert list(loaded.fp8_layer_formats) == list(config.fp8_layer_formats)  # order = priority
    # The file is plain YAML: every field, tags as a list, mesh as a nested mapping.
    data = yaml.safe_load(path.read_text())
    assert set(data) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert data["tags"] == list(config.tags)
    assert data["mesh"] == {"data_parallel": config.mesh.data_parallel}


def test_non_default_config_differs_from_default_in_every_field():
    default, other = TrainConfig(), TrainConfig(**NON_DEFAULT)
    same = [f.name for f in dataclasses.fields(TrainConfig)
            if getattr(default, f.name) == getattr(other, f.name)]
    assert same == ["quantize_gradients"]  # kept True so backward formats are exercised


def test_defaults_match_contract():
    c = TrainConfig()
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.dropout) == \
        (6, 6, 384, 256, 256, 0.0)
    assert (c.batch_size, c.learning_rate, c.max_steps, c.warmup_steps, c.grad_clip) == \
        (64, 3e-4, 5000, 100, 1.0)
    assert (c.use_fp8, c.fp8_format, c.use_shadow, c.amax_history_len) == (False, "E5M2", False, 16)
    assert (c.checkpoint_interval, c.checkpoint_dir, c.max_checkpoints) == (100, None, 3)
    assert c.tags == () and c.run_name is None and c.seed == 42 and c.data == "pystdlib"
    assert c.mesh == MeshConfig(data_parallel=-1)


@pytest.mark.parametrize("name", ["default.yaml", "gpt2_small.yaml"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert config.use_fp8


def test_shipped_config_values():
    default = load_config(CONFIGS / "default.yaml")
    assert (default.n_layer, default.n_head, default.n_embd, default.block_size) == (2, 4, 128, 64)
    assert (default.batch_size, default.max_steps, default.fp8_format) == (32, 300, "E5M2")
    assert default.use_shadow and default.eval_interval == 50 and default.out_dir == "runs/default"
    gpt2 = load_config(CONFIGS / "gpt2_small.yaml")
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size, gpt2.vocab_size) == \
        (12, 12, 768, 1024, 50304)
    assert gpt2.learning_rate == 6e-4  # written as `6e-4`, which YAML reads as a string


# --- bad input -----------------------------------------------------------------------------

BAD_VALUES = [
    # (key, value, words the message must contain)
    ("n_layer", "six", "integer"),
    ("n_layer", True, "integer"),
    ("n_layer", 2.5, "whole number"),
    ("n_layer", None, "integer"),
    ("learning_rate", "fast", "number"),
    ("learning_rate", True, "number"),
    ("learning_rate", "nan", "finite"),
    ("grad_clip", float("inf"), "finite"),
    ("use_fp8", "yes please", "true or false"),
    ("use_fp8", 1, "true or false"),
    ("data", 3, "string"),
    ("out_dir", "", "empty"),
    ("tags", "one", "list of strings"),
    ("tags", [1], "string"),
    ("fp8_layer_formats", ["lm_head"], "mapping"),
    ("mesh", 2, "mapping"),
    ("n_layer", 0, ">= 1"),
    ("n_head", -1, ">= 1"),
    ("n_embd", 0, ">= 1"),
    ("block_size", 0, ">= 1"),
    ("vocab_size", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("max_steps", 0, ">= 1"),
    ("dropout", 1.0, "[0, 1)"),
    ("dropout", -0.1, "[0, 1)"),
    ("learning_rate", 0, "> 0"),
    ("min_lr_ratio", 1.5, "[0, 1]"),
    ("warmup_steps", -1, ">= 0"),
    ("warmup_steps", 5001, "max_steps"),
    ("grad_clip", -1.0, ">= 0"),
    ("weight_decay", -0.1, ">= 0"),
    ("beta1", 1.0, "[0, 1)"),
    ("beta2", -0.5, "[0, 1)"),
    ("fp8_format", "E9M9", "unknown format"),
    ("fp8_format", "FP32", "unknown format"),
    ("fp8_forward_format", "E4M4", "unknown format"),
    ("fp8_backward_format", "bf16", "unknown format"),
    ("fp8_layer_formats", {"lm_head": "E8M8"}, "unknown format"),
    ("fp8_layer_formats", {"": "E5M2"}, "pattern"),
    ("amax_history_len", 0, ">= 1"),
    ("fp8_amax_margin", 0.9, ">= 1"),
    ("checkpoint_interval", 0, ">= 1"),
    ("max_checkpoints", 0, ">= 1"),
    ("nan_patience", 0, ">= 1"),
    ("bit_stall_threshold", 1.5, "[0, 1]"),
    ("overflow_threshold", -0.01, "[0, 1]"),
    ("dead_neuron_threshold", -1e-8, ">= 0"),
    ("dead_neuron_window", 0, ">= 1"),
    ("alert_wait_seconds", -1, ">= 0"),
    ("log_interval", 0, ">= 1"),
    ("eval_interval", 0, ">= 1"),
    ("eval_iters", 0, ">= 1"),
    ("wandb_mode", "sometimes", "online"),
    ("seed", -1, "[0, 4294967296)"),
]


def assert_one_line(error, *needles):
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize("key,value,words", BAD_VALUES,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_field(key, value, words):
    with pytest.raises(ConfigError) as error:
        config_from_dict({key: value})
    assert_one_line(error, key, words)


@pytest.mark.parametrize("key,value,words", BAD_VALUES[:3] + BAD_VALUES[15:18],
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES[:3] + BAD_VALUES[15:18]])
def test_bad_value_in_file_names_file_and_field(tmp_path, key, value, words):
    path = write(tmp_path, yaml.safe_dump({key: value}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert_one_line(error, str(path), key, words)


def test_n_embd_must_divide_by_n_head():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"n_embd": 100, "n_head": 6})
    assert_one_line(error, "n_embd", "n_head=6")


def test_mesh_data_parallel_range():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"mesh": {"data_parallel": 0}})
    assert_one_line(error, "mesh.data_parallel", "-1")
    assert config_from_dict({"mesh": {"data_parallel": 8}}).mesh.data_parallel == 8


@pytest.mark.parametrize("data,key,suggestion", [
    ({"n_layers": 2}, "'n_layers'", "'n_layer'"),
    ({"learnign_rate": 1e-3}, "'learnign_rate'", "'learning_rate'"),
    ({"mesh": {"data_paralel": 2}}, "'mesh.data_paralel'", "'mesh.data_parallel'"),
    ({"zzzzzz": 1}, "'zzzzzz'", None),
])
def test_unknown_key_suggests_closest(data, key, suggestion):
    with pytest.raises(ConfigError) as error:
        config_from_dict(data)
    assert_one_line(error, "unknown config key", key)
    if suggestion:
        assert_one_line(error, f"did you mean {suggestion}")
    else:
        assert "did you mean" not in str(error.value)


BAD_FILES = [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("- n_layer\n- 2\n", "top level must be a mapping"),
    ("just a string\n", "top level must be a mapping"),
    ("n_layer: 2\n  n_head: [\n", "YAML error at line"),
    ("n_layer: [1, 2\n", "YAML error at line"),
    ("n_layer: 2\nn_layer: 3\n", "duplicate key 'n_layer'"),
    ("mesh: {data_parallel: 1, data_parallel: 2}\n", "duplicate key 'data_parallel'"),
]


@pytest.mark.parametrize("text,words", [*BAD_FILES, ("1: 2\n", "not a string")])
def test_bad_file(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert_one_line(error, str(path), words)


@pytest.mark.parametrize("text,words", BAD_FILES)
def test_read_config_mapping_refuses_what_load_config_refuses(tmp_path, text, words):
    """The file errors belong to reading: load_config reports exactly what read_config_mapping does."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as read_error:
        read_config_mapping(path)
    assert_one_line(read_error, str(path), words)
    with pytest.raises(ConfigError) as load_error:
        load_config(path)
    assert str(load_error.value) == str(read_error.value)


def test_read_config_mapping_keeps_keys_a_caller_takes_out(tmp_path):
    """Keys that are not config fields (a study file's `recipes`) come back unvalidated."""
    path = write(tmp_path, "n_layer: 2\nrecipes: {hybrid: {fp8_forward_format: E4M3}}\nlearning_rate: 6e-4\n")
    assert read_config_mapping(path) == {"n_layer": 2, "recipes": {"hybrid": {"fp8_forward_format": "E4M3"}},
                                         "learning_rate": "6e-4"}
    with pytest.raises(ConfigError) as error:
        read_config_mapping(tmp_path / "nope.yaml")
    assert_one_line(error, "nope.yaml: config file not found")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert_one_line(error, str(path), "not found")


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# --- type coercion -------------------------------------------------------------------------

def test_numeric_strings_and_ints_are_accepted_where_exact(tmp_path):
    path = write(tmp_path, "learning_rate: 6e-4\ndead_neuron_threshold: 1e-8\n"
                           "grad_clip: 2\nmax_steps: 1e3\nbatch_size: '16'\nn_layer: 4.0\n")
    config = load_config(path)
    assert config.learning_rate == 6e-4 and type(config.learning_rate) is float
    assert config.dead_neuron_threshold == 1e-8
    assert config.grad_clip == 2.0 and type(config.grad_clip) is float
    assert config.max_steps == 1000 and type(config.max_steps) is int
    assert config.batch_size == 16 and config.n_layer == 4 and type(config.n_layer) is int


def test_format_names_are_case_insensitive_and_canonical():
    config = config_from_dict({"fp8_format": "e4m3",
                               "fp8_layer_formats": {"a": "none", "b": "Fp32", "c": "e2m5"}})
    assert config.fp8_format == "E4M3"
    assert config.fp8_layer_formats == {"a": "FP32", "b": "FP32", "c": "E2M5"}


def test_tags_list_becomes_tuple():
    config = config_from_dict({"tags": ["x", "y"], "fp8_layer_formats": {"lm_head": "FP32"}})
    assert config.tags == ("x", "y")
    assert config_from_dict(config.to_dict()) == config


def test_every_field_is_declared_once_with_its_doc_and_rule():
    """Each field's type, range or choices and documentation come from its `setting(...)`."""
    for cls in (TrainConfig, MeshConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"].strip(), f"{cls.__name__}.{f.name} has no doc"
            assert callable(f.metadata["rule"].read), f"{cls.__name__}.{f.name} has no rule"
    assert TrainConfig().fp8_layer_formats is not TrainConfig().fp8_layer_formats  # mutable default copied


def test_types_are_checked_before_ranges_across_fields():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"n_layer": 0, "seed": "x"})
    assert_one_line(error, "seed: expected an integer")


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().n_layer = 3


# --- overrides and replace -----------------------------------------------------------------

def test_parse_overrides_yaml_values_and_sections():
    parsed = parse_overrides(["n_layer=4", "learning_rate=6e-4", "use_fp8=true", "run_name=",
                              "tags=[a, b]", "mesh.data_parallel=2", "fp8_format = E4M3",
                              "fp8_layer_formats={lm_head: FP32}"])
    assert parsed == {"n_layer": 4, "learning_rate": "6e-4", "use_fp8": True, "run_name": "",
                      "tags": ["a", "b"], "mesh": {"data_parallel": 2}, "fp8_format": "E4M3",
                      "fp8_layer_formats": {"lm_head": "FP32"}}


def test_nothing_after_the_equals_sign_is_the_empty_string():
    """As `project: ""` in YAML (not YAML's None for an empty value): W&B off from the command line."""
    assert parse_overrides(["project=", "tags= ", "run_name=null", 'out_dir=""']) == {
        "project": "", "tags": "", "run_name": None, "out_dir": ""}
    assert apply_overrides(TrainConfig(), ["project="]).project == ""
    assert apply_overrides(TrainConfig(project=""), ["project=altgrad"]).project == "altgrad"
    assert apply_overrides(TrainConfig(run_name="x"), ["run_name=null"]).run_name is None
    with pytest.raises(ConfigError) as error:
        apply_overrides(TrainConfig(), ["run_name="])  # str | None: the empty string is refused
    assert_one_line(error, "run_name: must not be empty")


def test_apply_overrides_validates_and_keeps_the_rest():
    base = TrainConfig(n_layer=3, mesh=MeshConfig(data_parallel=4))
    config = apply_overrides(base, ["learning_rate=6e-4", "mesh.data_parallel=2",
                                    "tags=[a]", "use_fp8=true", "n_layer=5"])
    assert config.learning_rate == 6e-4 and config.mesh.data_parallel == 2
    assert config.tags == ("a",) and config.use_fp8 and config.n_layer == 5
    assert config == base.replace(learning_rate=6e-4, mesh=MeshConfig(2), tags=("a",),
                                  use_fp8=True, n_layer=5)
    assert apply_overrides(base, []) == base


@pytest.mark.parametrize("overrides,words", [
    (["n_layer"], "key=value"),
    (["=3"], "key=value"),
    (["n_layer=six"], "n_layer"),
    (["n_layers=2"], "did you mean 'n_layer'"),
    (["mesh.data_paralel=2"], "did you mean 'mesh.data_parallel'"),
    (["mseh.data_parallel=2"], "did you mean 'mesh'"),
    (["n_layer.x=2"], "not a config section"),
    (["mesh.a.b=2"], "section.key"),
    (["tags=[a"], "override tags"),
    (["fp8_format=E9M9"], "fp8_format"),
    (["n_embd=100"], "n_embd"),
])
def test_bad_overrides(overrides, words):
    with pytest.raises(ConfigError) as error:
        apply_overrides(TrainConfig(), overrides)
    assert_one_line(error, words)


def test_replace_is_validated():
    config = TrainConfig()
    assert config.replace(n_layer=2).n_layer == 2
    assert config.replace(learning_rate="1e-3").learning_rate == 1e-3
    with pytest.raises(ConfigError) as error:
        config.replace(dropout=1.0)
    assert_one_line(error, "dropout")
    with pytest.raises(ConfigError) as error:
        config.replace(nlayer=2)
    assert_one_line(error, "'nlayer'", "did you mean 'n_layer'")


# --- derived values ------------------------------------------------------------------------

def test_checkpoint_path():
    assert TrainConfig(out_dir="runs/a").checkpoint_path == "runs/a/checkpoints"
    assert TrainConfig(out_dir="runs/a", checkpoint_dir="/ck").checkpoint_path == "/ck"


def test_to_dict_is_plain_builtins():
    data = TrainConfig(**NON_DEFAULT).to_dict()
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert config_from_dict(data) == TrainConfig(**NON_DEFAULT)
