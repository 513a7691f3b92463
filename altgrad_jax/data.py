"""Token data for training: the built-in `pystdlib` corpus, text files, nanoGPT `.bin` directories.

Every dataset is two 1-D token arrays (train, val), memory-mapped from disk. Batches are a pure
function of (seed, step), so a resumed run needs no loader state. All checks happen in
`load_dataset`, before anything is compiled; failures raise `DataError` with a one-line message.

`pystdlib` is a byte-level corpus made of the `.py` files of the running interpreter's standard
library (`sysconfig.get_paths()["stdlib"]`), walked in sorted order, skipping the directories in
`PYSTDLIB_EXCLUDED_DIRS` (third-party packages, test suites, caches). Every tenth file of that
sorted list goes to validation, so the split is by file and does not move when the size cap cuts
the list short. It is built once and cached under
`$XDG_CACHE_HOME/altgrad_jax/` (default `~/.cache/altgrad_jax/`) in a directory named after the
Python version and a hash of the file list, written into a temporary directory that is renamed
into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PYSTDLIB = "pystdlib"
PYSTDLIB_MAX_BYTES = 24 * 2**20
PYSTDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
PYSTDLIB_VAL_EVERY = 10
BYTE_VOCAB = 256
TEXT_VAL_FRACTION = 0.1
_CACHE_FORMAT = 1  # bump when the corpus layout changes, so old caches are not reused


class DataError(ValueError):
    """Unusable data specification or contents; the message is one line naming the problem."""


@dataclass(frozen=True)
class Dataset:
    train: np.ndarray  # 1-D uint8 or uint16 tokens, usually a read-only np.memmap
    val: np.ndarray
    vocab_size: int
    description: str


def load_dataset(
    spec: str,
    *,
    vocab_size: int,
    block_size: int,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    pystdlib_max_bytes: int = PYSTDLIB_MAX_BYTES,
) -> Dataset:
    """Load `spec`: "pystdlib", a text file (bytes, vocab 256, last 10% is val), or a directory
    holding nanoGPT-style `train.bin`/`val.bin` (uint16 tokens).

    `cache_dir` replaces the `altgrad_jax` cache root for `pystdlib`; `progress` shows a tqdm bar
    on stderr while that corpus is built. Raises DataError for anything that cannot train
    `block_size`-token windows with `vocab_size` tokens.
    """
    _check_positive_int("vocab_size", vocab_size)
    _check_positive_int("block_size", block_size)
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise DataError(f"data must be 'pystdlib' or a path, got {spec!r}")
    spec = str(spec)
    if spec == PYSTDLIB:
        _check_byte_vocab(vocab_size, spec)
        train, val, description = _load_pystdlib(cache_dir, progress, pystdlib_max_bytes)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            train, val = _load_bin_dir(path, vocab_size)
            description = f"{path}: train.bin/val.bin uint16 tokens"
        elif path.is_file():
            _check_byte_vocab(vocab_size, spec)
            train, val = _load_text_file(path)
            description = f"{path}: bytes, last {TEXT_VAL_FRACTION:.0%} as validation"
        elif path.exists():
            raise DataError(f"data path {spec} is neither a regular file nor a directory")
        else:
            raise DataError(f"data path not found: {spec}")
    _check_length("train", train, block_size, spec)
    _check_length("val", val, block_size, spec)
    description += f" ({len(train):,} train / {len(val):,} val tokens)"
    return Dataset(train=train, val=val, vocab_size=vocab_size, description=description)


def get_batch(
    tokens: np.ndarray, *, seed: int, step: int, batch_size: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of `tokens` for training step `step`: (x, y) int32 [batch_size, block_size],
    with y the next token of each x. A pure function of (seed, step); works on memmaps."""
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("block_size", block_size)
    if step < 0:
        raise DataError(f"step must be >= 0, got {step}")
    n_starts = len(tokens) - block_size  # a window needs block_size + 1 tokens
    if n_starts < 1:
        raise DataError(f"{len(tokens)} tokens are fewer than block_size+1={block_size + 1}")
    rng = np.random.default_rng([seed % 2**64, step])
    starts = rng.integers(0, n_starts, size=batch_size)
    windows = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int32)
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


def eval_batches(
    tokens: np.ndarray, *, seed: int, n_batches: int, batch_size: int, block_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of `n_batches` batches (the same for every call with the same arguments)."""
    _check_positive_int("n_batches", n_batches)
    return [
        get_batch(tokens, seed=seed, step=i, batch_size=batch_size, block_size=block_size)
        for i in range(n_batches)
    ]


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "altgrad_jax"


def pystdlib_files(stdlib: Path | None = None) -> list[Path]:
    """The `.py` files of the standard library in corpus order (sorted relative paths)."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in PYSTDLIB_EXCLUDED_DIRS)
        found += [Path(dirpath, f).relative_to(stdlib) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.as_posix())


# --- pystdlib ------------------------------------------------------------------------------


def _load_pystdlib(cache_dir, progress: bool, max_bytes: int):
    _check_positive_int("pystdlib_max_bytes", max_bytes)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen = _select_files(stdlib, max_bytes)
    if not chosen:
        raise DataError(f"no standard-library .py files found under {stdlib}")
    key = hashlib.sha256(
        json.dumps([_CACHE_FORMAT, str(stdlib), max_bytes, PYSTDLIB_VAL_EVERY, chosen]).encode()
    ).hexdigest()[:12]
    version = ".".join(map(str, sys.version_info[:3]))
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    corpus_dir = root / f"pystdlib-{version}-{key}"
    if not corpus_dir.is_dir():
        _build_pystdlib(stdlib, chosen, corpus_dir, progress)
    train, val = (_memmap(corpus_dir / name, np.uint8) for name in ("train.bin", "val.bin"))
    n_files = len(chosen)
    return train, val, f"pystdlib: {n_files} files of Python {version} stdlib at {corpus_dir}"


def _select_files(stdlib: Path, max_bytes: int) -> list[tuple[str, int, bool]]:
    """(relative path, size, is_val) in corpus order, whole files, stopping before the cap."""
    chosen, total = [], 0
    for index, rel in enumerate(pystdlib_files(stdlib)):
        try:
            size = (stdlib / rel).stat().st_size
        except OSError:
            continue
        if size == 0:
            continue
        if total + size > max_bytes:
            break
        chosen.append((rel.as_posix(), size, index % PYSTDLIB_VAL_EVERY == PYSTDLIB_VAL_EVERY - 1))
        total += size
    return chosen


def _build_pystdlib(stdlib: Path, chosen, corpus_dir: Path, progress: bool) -> None:
    from tqdm import tqdm

    try:
        corpus_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-pystdlib-", dir=corpus_dir.parent))
    except OSError as e:
        raise DataError(f"cannot create the corpus cache in {corpus_dir.parent}: {e}") from None
    try:
        parts = {False: [], True: []}
        total = sum(size for _, size, _ in chosen)
        bar = tqdm(total=total, desc="building pystdlib corpus", unit="B", unit_scale=True,
                   file=sys.stderr, disable=not progress)
        with bar:
            for rel, size, is_val in chosen:
                text = (stdlib / rel).read_bytes()
                parts[is_val].append(text if text.endswith(b"\n") else text + b"\n")
                bar.update(size)
        for name, is_val in (("train.bin", False), ("val.bin", True)):
            (tmp_dir / name).write_bytes(b"".join(parts[is_val]))
        meta = {"stdlib": str(stdlib), "files": [rel for rel, _, _ in chosen]}
        (tmp_dir / "files.json").write_text(json.dumps(meta, indent=0))
        try:
            tmp_dir.rename(corpus_dir)
        except OSError:
            if not corpus_dir.is_dir():  # otherwise another process finished the same build first
                raise
    except OSError as e:
        raise DataError(f"cannot write the corpus cache {corpus_dir}: {e}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# --- files and directories -----------------------------------------------------------------


def _load_text_file(path: Path):
    tokens = _memmap(path, np.uint8)
    n_val = int(len(tokens) * TEXT_VAL_FRACTION)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def _load_bin_dir(path: Path, vocab_size: int):
    splits = []
    for name in ("train.bin", "val.bin"):
        file = path / name
        if not file.is_file():
            raise DataError(f"data directory {path} has no {name} (nanoGPT layout expected)")
        if file.stat().st_size % 2:
            raise DataError(f"{file} has an odd number of bytes; uint16 tokens expected")
        tokens = _memmap(file, np.uint16)
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise DataError(
                f"{file} holds token {largest} but vocab_size is {vocab_size}; "
                f"set vocab_size to at least {largest + 1}"
            )
        splits.append(tokens)
    return tuple(splits)


def _memmap(path: Path, dtype) -> np.ndarray:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if size == 0:
        raise DataError(f"{path} is empty")
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


# --- checks --------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def _check_byte_vocab(vocab_size: int, spec: str) -> None:
    if vocab_size < BYTE_VOCAB:
        raise DataError(
            f"data {spec!r} is byte-level and needs vocab_size >= {BYTE_VOCAB}, got {vocab_size}"
        )


def _check_length(split: str, tokens: np.ndarray, block_size: int, spec: str) -> None:
    if len(tokens) < block_size + 1:
        raise DataError(
            f"data {spec!r}: the {split} split has {len(tokens)} tokens, fewer than "
            f"block_size+1={block_size + 1}"
        )
