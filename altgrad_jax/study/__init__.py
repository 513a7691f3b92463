"""The format study: sweep arms (formats, FP32, named recipes) over seeds, then report.

arms.py    the study config (its `recipes` section) and one TrainConfig per arm and seed
sweep.py   `python -m altgrad_jax.study.sweep`: plan, skip finished runs, resume, manifest
launch.py  child processes: one device each, prefixed output, signals passed on
child.py   the child's entry point: dies with the sweep, then runs altgrad_jax.run
runs.py    reading run directories and grouping seeds by arm
analysis.py  the numbers: final/best loss, divergence, first threshold crossed, verdicts
report.py  `python -m altgrad_jax.study.report`: report.md; figures.py draws the PNGs
"""
