"""Per-layer slot recipes from the config: defaults, shorthands, ordered rules, validation."""

import pytest

from altgrad_jax.config import ConfigError, TrainConfig, load_config
from altgrad_jax.quant import SlotRecipe, layer_recipe


def formats(config, layer):
    recipe = layer_recipe(config, layer)
    return recipe.x.format, recipe.w.format, recipe.dy.format


def test_shorthands_set_the_forward_slots_and_the_backward_slot():
    config = TrainConfig(use_fp8=True, fp8_format="E5M2", fp8_forward_format="E4M3")
    assert formats(config, "h/0/mlp/c_fc") == ("E4M3", "E4M3", "E5M2")
    assert formats(config.replace(fp8_forward_format=None, fp8_backward_format="E3M4"), "lm_head") == \
        ("E5M2", "E5M2", "E3M4")
    assert formats(config.replace(use_fp8=False), "lm_head") == (None, None, None)
    assert formats(config.replace(quantize_activations=False), "lm_head") == (None, "E4M3", "E5M2")
    assert formats(config.replace(quantize_gradients=False), "lm_head") == ("E4M3", "E4M3", None)


def test_layer_formats_shorthand_first_match_wins_for_all_slots():
    config = TrainConfig(use_fp8=True, fp8_format="E5M2", fp8_forward_format="E4M3", fp8_layer_formats={
        "lm_head": "FP32", "h/0/mlp/*": "E2M5", "h/*/mlp/*": "E3M4", "h/*/attn/c_proj": "none"})
    assert formats(config, "lm_head") == (None, None, None)
    assert formats(config, "h/0/mlp/c_fc") == ("E2M5",) * 3  # first match wins over the broader pattern
    assert formats(config, "h/1/mlp/c_proj") == ("E3M4",) * 3
    assert formats(config, "h/1/attn/c_proj") == (None, None, None)
    assert formats(config, "h/1/attn/c_attn") == ("E4M3", "E4M3", "E5M2")  # no pattern: the shorthands
    assert not layer_recipe(config, "lm_head").quantized


def test_rules_override_the_slots_they_name_first_match_wins():
    config = TrainConfig(
        use_fp8=True, fp8_format="E5M2", fp8_scaling={"x": "current"}, fp8_rounding="nearest",
        fp8_layer_rules=[
            {"match": "lm_head", "format": "FP32"},
            {"match": "h/*/mlp/*", "forward": "E4M3", "dy": "E3M4", "scaling": "none"},
            {"match": "h/0/*", "w": "E2M5", "rounding": {"w": "stochastic"}},  # shadowed for h/0/mlp/*
            {"match": "h/1/*", "format": "E7M0", "x": "FP32"},
        ],
        fp8_layer_formats={"h/*": "E3M4"})  # rules come first; this only catches what they miss
    assert not layer_recipe(config, "lm_head").quantized
    mlp = layer_recipe(config, "h/0/mlp/c_fc")
    assert (mlp.x, mlp.w, mlp.dy) == (SlotRecipe("E4M3", "none"), SlotRecipe("E4M3", "none"),
                                      SlotRecipe("E3M4", "none"))
    attn = layer_recipe(config, "h/0/attn/c_attn")
    assert (attn.x, attn.w, attn.dy) == (SlotRecipe("E5M2", "current"), SlotRecipe("E2M5", "delayed", "stochastic"),
                                         SlotRecipe("E5M2", "delayed"))
    assert formats(config, "h/1/attn/c_proj") == (None, "E7M0", "E7M0")  # x beats format inside a rule
    assert formats(config.replace(fp8_layer_rules=[]), "h/1/attn/c_proj") == ("E3M4",) * 3


def test_hybrid_recipe_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("use_fp8: true\nfp8_forward_format: e4m3\nfp8_backward_format: E5M2\n"
                    "fp8_scaling: {dy: current}\nfp8_rounding: {w: stochastic}\n"
                    "fp8_layer_rules:\n  - {match: lm_head, format: fp32}\n")
    config = load_config(path)
    assert config.fp8_scaling == {"x": "delayed", "w": "delayed", "dy": "current"}
    assert config.fp8_layer_rules == ({"match": "lm_head", "x": "FP32", "w": "FP32", "dy": "FP32"},)
    recipe = layer_recipe(config, "h/0/attn/c_attn")
    assert recipe.w == SlotRecipe("E4M3", "delayed", "stochastic") and recipe.dy == SlotRecipe("E5M2", "current")
    assert recipe.margin == config.fp8_amax_margin and recipe.for_eval().w.rounding == "nearest"


@pytest.mark.parametrize("field,value,message", [
    ("fp8_scaling", "later", "fp8_scaling: must be one of delayed, current, none"),
    ("fp8_scaling", {"z": "current"}, "unknown config key 'fp8_scaling.z'"),
    ("fp8_rounding", {"dy": "up"}, "fp8_rounding.dy: must be one of nearest, stochastic"),
    ("fp8_layer_rules", {"match": "x"}, "fp8_layer_rules: expected a list of rules"),
    ("fp8_layer_rules", [{"format": "E4M3"}], "fp8_layer_rules[0].match: must be a non-empty glob"),
    ("fp8_layer_rules", [{"match": "lm_head"}], "fp8_layer_rules[0]: rule for 'lm_head' sets nothing"),
    ("fp8_layer_rules", [{"match": "a", "dy": "E9M9"}], "fp8_layer_rules[0].dy: unknown format 'E9M9'"),
    ("fp8_layer_rules", [{"match": "a", "formats": "E4M3"}], "did you mean 'fp8_layer_rules[0].format'"),
])
def test_bad_recipe_settings_are_one_line_errors(field, value, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{field: value})
    text = str(error.value)
    assert message in text and "\n" not in text


def test_hardware_gemm_recipe_is_checked_when_the_step_is_built():
    from altgrad_jax.train_step import make_train_step
    config = TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, use_fp8=True,
                         fp8_hardware_gemm=True, fp8_format="E5M2")
    with pytest.raises(ValueError, match=r"E5M2 x E5M2 GEMM \(x.w in layer h/0/attn/c_attn"):
        make_train_step(config)
    with pytest.raises(ValueError, match="format E3M4 has no FP8 tensor-core GEMM"):
        make_train_step(config.replace(fp8_forward_format="E4M3", fp8_backward_format="E3M4"))
