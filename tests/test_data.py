import sysconfig
from pathlib import Path

import numpy as np
import pytest

from altgrad_jax.data import (
    PYSTDLIB_VAL_EVERY,
    DataError,
    eval_batches,
    get_batch,
    load_dataset,
    pystdlib_files,
)

SMALL_CAP = 400_000


def load_small_pystdlib(cache_dir, **kw):
    return load_dataset("pystdlib", vocab_size=256, block_size=32, cache_dir=cache_dir,
                        progress=False, pystdlib_max_bytes=SMALL_CAP, **kw)


def test_pystdlib_is_the_stdlib_sources_split_by_file(tmp_path):
    data = load_small_pystdlib(tmp_path)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = pystdlib_files()
    assert files and all(p.suffix == ".py" for p in files)
    assert not any({"site-packages", "test", "tests"} & set(p.parts) for p in files)
    # independent rebuild: the same files in sorted order, every 10th to val, under the cap
    train, val, total = [], [], 0
    for index, rel in enumerate(sorted(files, key=lambda p: p.as_posix())):
        text = (stdlib / rel).read_bytes()
        if not text:
            continue
        if total + len(text) > SMALL_CAP:
            break
        total += len(text)
        text += b"" if text.endswith(b"\n") else b"\n"
        (val if index % PYSTDLIB_VAL_EVERY == PYSTDLIB_VAL_EVERY - 1 else train).append(text)
    assert data.train.dtype == np.uint8 and data.val.dtype == np.uint8
    assert bytes(data.train) == b"".join(train)
    assert bytes(data.val) == b"".join(val)
    assert 0 < len(data.val) < len(data.train)
    assert data.vocab_size == 256 and "pystdlib" in data.description


def test_pystdlib_cache_is_reused_and_complete(tmp_path, monkeypatch):
    first = load_small_pystdlib(tmp_path)
    (corpus_dir,) = [p for p in tmp_path.iterdir()]
    assert corpus_dir.name.startswith("pystdlib-") and not corpus_dir.name.startswith(".tmp")
    assert sorted(p.name for p in corpus_dir.iterdir()) == ["files.json", "train.bin", "val.bin"]
    stamp = (corpus_dir / "train.bin").stat().st_mtime_ns
    second = load_small_pystdlib(tmp_path)
    assert (corpus_dir / "train.bin").stat().st_mtime_ns == stamp  # read from the cache
    assert np.array_equal(first.train, second.train)
    # another cap is another corpus, in its own directory
    load_dataset("pystdlib", vocab_size=256, block_size=32, cache_dir=tmp_path, progress=False,
                 pystdlib_max_bytes=SMALL_CAP // 2)
    assert len(list(tmp_path.iterdir())) == 2
    # default location follows XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_dataset("pystdlib", vocab_size=256, block_size=32, progress=False,
                 pystdlib_max_bytes=SMALL_CAP)
    assert [p.name for p in (tmp_path / "xdg" / "altgrad_jax").iterdir()] == [corpus_dir.name]


def test_pystdlib_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    import altgrad_jax.data as data_module

    def disk_full(self, data):  # a full disk cannot be produced for real in a test
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_module.Path, "write_bytes", disk_full)
    with pytest.raises(DataError, match="No space left"):
        load_small_pystdlib(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_get_batch_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    kw = dict(batch_size=8, block_size=16)
    x1, y1 = get_batch(tokens, seed=3, step=5, **kw)
    x2, y2 = get_batch(tokens, seed=3, step=5, **kw)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, get_batch(tokens, seed=3, step=6, **kw)[0])
    assert not np.array_equal(x1, get_batch(tokens, seed=4, step=5, **kw)[0])
    assert x1.dtype == y1.dtype == np.int32 and x1.shape == y1.shape == (8, 16)
    # windows of consecutive tokens, y shifted by one
    assert np.array_equal(y1, x1 + 1)
    assert np.array_equal(np.diff(x1, axis=1), np.ones((8, 15)))
    # offsets are those of np.random.default_rng([seed, step]) over all valid starts
    starts = np.random.default_rng([3, 5]).integers(0, 1000 - 16, size=8)
    assert np.array_equal(x1[:, 0], starts)


def test_get_batch_reaches_the_last_token_and_never_past_it():
    tokens = np.arange(20, dtype=np.uint8)
    x, y = get_batch(tokens, seed=0, step=0, batch_size=4000, block_size=10)
    assert x.min() == 0 and y.max() == 19


def test_get_batch_on_memmap(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(500, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = get_batch(tokens, seed=1, step=2, batch_size=4, block_size=8)
    assert type(x) is np.ndarray and np.array_equal(y, x + 1)


def test_eval_batches_fixed():
    tokens = np.arange(300, dtype=np.uint8)
    a = eval_batches(tokens, seed=7, n_batches=3, batch_size=2, block_size=5)
    b = eval_batches(tokens, seed=7, n_batches=3, batch_size=2, block_size=5)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not np.array_equal(a[0][0], a[1][0])


def test_text_file_round_trip(tmp_path):
    text = bytes(range(256)) * 4 + "héllo wörld\n".encode() * 10
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    data = load_dataset(str(path), vocab_size=256, block_size=8, progress=False)
    n_val = len(text) // 10
    assert bytes(data.train) == text[:-n_val] and bytes(data.val) == text[-n_val:]
    assert data.train.dtype == np.uint8
    x, y = get_batch(data.train, seed=0, step=0, batch_size=3, block_size=8)
    assert x.max() <= 255


def test_bin_dir_round_trip(tmp_path):
    train = np.random.default_rng(0).integers(0, 50257, size=400).astype(np.uint16)
    val = np.arange(100, dtype=np.uint16)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    data = load_dataset(str(tmp_path), vocab_size=50304, block_size=16)
    assert data.train.dtype == np.uint16
    assert np.array_equal(data.train, train) and np.array_equal(data.val, val)
    assert data.vocab_size == 50304


def write_bin(dir_path, train, val):
    dir_path.mkdir(exist_ok=True)
    np.asarray(train, dtype=np.uint16).tofile(dir_path / "train.bin")
    np.asarray(val, dtype=np.uint16).tofile(dir_path / "val.bin")
    return str(dir_path)


def bad_cases(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"x" * 50)  # val = 5 bytes < block_size+1
    (tmp_path / "ok.txt").write_bytes(b"x" * 1000)
    (tmp_path / "nobin").mkdir()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train.bin").write_bytes(b"abc")
    (tmp_path / "odd" / "val.bin").write_bytes(b"ab")
    (tmp_path / "emptybin").mkdir()
    (tmp_path / "emptybin" / "train.bin").write_bytes(b"")
    (tmp_path / "emptybin" / "val.bin").write_bytes(b"")
    big_token = write_bin(tmp_path / "big", [1, 2, 50256] * 20, [3] * 60)
    short_val = write_bin(tmp_path / "sv", [1] * 60, [1] * 5)
    return [
        # (spec, kwargs, expected message fragment)
        (str(tmp_path / "missing.txt"), {}, "not found"),
        (str(tmp_path / "empty.txt"), {}, "empty"),
        (str(tmp_path / "short.txt"), {}, "val split has 5 tokens"),
        (str(tmp_path / "ok.txt"), {"block_size": 1000}, "train split has 900 tokens"),
        (str(tmp_path / "ok.txt"), {"vocab_size": 100}, "vocab_size >= 256"),
        ("pystdlib", {"vocab_size": 65}, "vocab_size >= 256"),
        (str(tmp_path / "nobin"), {}, "has no train.bin"),
        (str(tmp_path / "odd"), {}, "odd number of bytes"),
        (str(tmp_path / "emptybin"), {}, "empty"),
        (big_token, {"vocab_size": 50000}, "token 50256 but vocab_size is 50000"),
        (short_val, {"vocab_size": 256}, "val split has 5 tokens"),
        ("", {}, "'pystdlib' or a path"),
        (str(tmp_path / "ok.txt"), {"block_size": 0}, "block_size must be a positive integer"),
        (str(tmp_path / "ok.txt"), {"vocab_size": 2.5}, "vocab_size must be a positive integer"),
    ]


def test_bad_data_is_one_line_data_error(tmp_path):
    for spec, kw, fragment in bad_cases(tmp_path):
        kwargs = {"vocab_size": 256, "block_size": 16, "progress": False, **kw}
        with pytest.raises(DataError) as info:
            load_dataset(spec, cache_dir=tmp_path / "cache", **kwargs)
        message = str(info.value)
        assert fragment in message, (spec, kw, message)
        assert "\n" not in message
    assert isinstance(DataError("x"), ValueError)
    assert not (tmp_path / "cache").exists()


def test_get_batch_rejects_too_short_tokens():
    with pytest.raises(DataError, match="fewer than block_size"):
        get_batch(np.arange(8, dtype=np.uint8), seed=0, step=0, batch_size=2, block_size=8)


def test_unusable_cache_dir_is_data_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(DataError, match="cannot create the corpus cache"):
        load_small_pystdlib(not_a_dir / "sub")
