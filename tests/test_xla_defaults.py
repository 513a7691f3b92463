"""The XLA flags the package sets by default, and that a user's own setting wins."""

import os
import subprocess
import sys

from altgrad_jax.xla_defaults import DEFAULT_FLAGS, apply_default_xla_flags


def test_defaults_are_appended_once_and_a_users_choice_of_the_option_is_kept():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    apply_default_xla_flags(environ)
    apply_default_xla_flags(environ)
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", *DEFAULT_FLAGS]
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    apply_default_xla_flags(mine)
    assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    empty = {}
    apply_default_xla_flags(empty)
    assert empty["XLA_FLAGS"] == " ".join(DEFAULT_FLAGS)


def ynn_fusions_of_a_matmul(import_package: bool) -> int:
    code = (("import altgrad_jax; " if import_package else "") + "import jax, jax.numpy as jnp; "
            "print(jax.jit(lambda a: jnp.exp(a @ a)).lower(jnp.ones((64, 64))).compile().as_text()"
            ".count('ynn_fusion'))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_importing_the_package_keeps_dots_and_elementwise_ops_out_of_ynnpack():
    assert ynn_fusions_of_a_matmul(import_package=False) > 0, "XLA's default no longer fuses it: nothing to test"
    assert ynn_fusions_of_a_matmul(import_package=True) == 0
