"""XLA flags for the test suite (conftest.py sets them for the session and its subprocesses):
unoptimised CPU code generation compiles a step about 1.5-2x faster. Every run a test compares
with another uses the same flags; test_golden.py pins the step's numbers under XLA's default
flags and under these. (Level 1 alone compiled no faster here, and broke two bitwise checks.)"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
