"""The XLA options this bench sets by default, in this one place (issue 14).

`--xla_cpu_experimental_ynn_fusion_type=reduce` keeps XLA:CPU's YNNPACK library fusions for
reductions only, so dots and elementwise ops compile to XLA's own kernels. On the 2-core CPU
machine (jax 0.10.2) the plain step then ran 10-20 % faster at the medium size of
benchmarks/bench_vs_torch.py (the small one within noise), and the operands those fusions need
materialised ([B, H, T, T] broadcasts in attention and LayerNorm) go away. Reductions stay with
YNNPACK because its sums are the more accurate ones: with every YNNPACK fusion off, the gradient
SNR over millions of float32 values drifts 1e-4 to 2e-3 from NumPy's (test_metrics.py fails).
Public reports also describe YNNPACK-fusion miscompilations on CPU with jaxlib 0.11. Only the
choice of kernel changes (float32 throughout, no fast math), so results move by rounding.

A flag already in XLA_FLAGS wins: set `--xla_cpu_experimental_ynn_fusion_type=<types>` there
for another choice (empty: none). XLA reads XLA_FLAGS when JAX first creates its backends, so this is applied on
`import altgrad_jax`; importing JAX and computing before that leaves XLA's own defaults.
"""

import os

DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=reduce",)


def apply_default_xla_flags(environ=os.environ) -> None:
    """Append each of DEFAULT_FLAGS to XLA_FLAGS unless XLA_FLAGS already sets that option."""
    flags = environ.get("XLA_FLAGS", "")
    for flag in DEFAULT_FLAGS:
        option = flag.split("=", 1)[0]
        if option not in flags:
            flags = f"{flags} {flag}".strip()
    environ["XLA_FLAGS"] = flags
