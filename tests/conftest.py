"""Fixtures shared by the end-to-end tests."""

import pytest


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small deterministic byte-level corpus, large enough for tiny models' train/val splits."""
    words = ("the quick brown fox jumps over the lazy dog while eight bit floats "
             "round every weight to the nearest code and the shadow keeps score").split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(2000)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path
