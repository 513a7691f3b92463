"""Fixtures shared by the end-to-end tests, and one compilation cache for the whole session."""

import os
import shutil
import tempfile

import pytest

from tests._fast_compile import FAST_COMPILE


def pytest_configure(config):
    _compile_fast()
    _share_one_compilation_cache(config)


def _compile_fast():
    """Most of the suite's time is XLA:CPU compiling small programs, which unoptimised code
    generation speeds up (_fast_compile.py). Set before JAX starts, for this process and every
    subprocess a test starts; test_golden.py pins the step under XLA's default flags too."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}".strip()


def _share_one_compilation_cache(config):
    """Many tests (and the CLI subprocesses they start, which inherit the environment) compile the
    same tiny steps; JAX's persistent compilation cache lets every compile after the first load
    the executable instead. A fresh directory per session, so nothing stale is ever read."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix="altgrad-jax-test-cache-")
    config._altgrad_cache_dir = directory
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    # A size limit makes JAX guard every read and write with a file lock, which the pytest-xdist
    # workers and the CLI subprocesses need: they all share this directory at the same time.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


def pytest_unconfigure(config):
    directory = getattr(config, "_altgrad_cache_dir", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small deterministic byte-level corpus, large enough for tiny models' train/val splits."""
    words = ("the quick brown fox jumps over the lazy dog while eight bit floats "
             "round every weight to the nearest code and the shadow keeps score").split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(2000)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path
