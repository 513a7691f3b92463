"""Command line: `python -m altgrad_jax.run --config PATH [--set key=value]... [--resume auto|never|PATH]`.

Exit status: 0 done, 2 bad input (one line on stderr, nothing created or deleted),
3 stopped by the NaN alert, 130 interrupted by Ctrl-C (143 by SIGTERM), after the pending save;
a second signal, or one outside the training loop, stops at once (same codes), abandoning a save
still in flight.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from altgrad_jax.loop.interrupts import StopAtOnce

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """Bad config, override, data, path or checkpoint: reported in one line, exit 2."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(f"command line: {message}")


def parse_args(argv):
    parser = _OneLineParser(prog="altgrad-run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set learning_rate=1e-3 (repeatable)")
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="auto (default): continue from the latest good checkpoint if any; "
                             "never: refuse when checkpoints exist; PATH: a checkpoint or step directory")
    return parser.parse_args(argv)


def prepare(args):
    """Everything that can fail on bad input, done before anything is written or compiled:
    config, data, mesh, and the starting state (fresh or restored)."""
    from altgrad_jax.ckpt.errors import CheckpointError
    from altgrad_jax.ckpt.resume import find_resume_point, restore_or_init
    from altgrad_jax.config import ConfigError, apply_overrides, load_config
    from altgrad_jax.data import DataError, load_dataset
    from altgrad_jax.sharding import make_mesh

    try:
        config = apply_overrides(load_config(args.config), args.overrides)
        resume_point = find_resume_point(args.resume, config.checkpoint_path)
        mesh = make_mesh(config.mesh, config.batch_size)
        dataset = load_dataset(config.data, vocab_size=config.vocab_size,
                               block_size=config.block_size, progress=sys.stderr.isatty())
        start = restore_or_init(config, resume_point, mesh)
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        raise BadInput(str(error)) from None
    return config, dataset, mesh, start


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def main(argv=None) -> int:
    # Outside the training loop (which stops at a step boundary, see loop/interrupts.py)
    # there is nothing to finish: Ctrl-C and SIGTERM end the process at once, without a traceback.
    with StopAtOnce():
        return _main(argv)


def _main(argv) -> int:
    warnings.formatwarning = _one_line_warning
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        from altgrad_jax.sharding import maybe_initialize_distributed

        try:
            maybe_initialize_distributed()
        except ValueError as error:
            raise BadInput(str(error)) from None
        config, dataset, mesh, (state, start_step, metadata) = prepare(args)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from altgrad_jax.loop.trainer import train

    return train(config, dataset, mesh, state, start_step, metadata)


def cli() -> None:
    """`python -m altgrad_jax.run` and `altgrad-run`: first restart with huge pages for malloc
    (hugepages.py; the same PID, not from main(), which tests call in process)."""
    from altgrad_jax.hugepages import restart_with_hugepages

    restart_with_hugepages()
    sys.exit(main())


if __name__ == "__main__":
    cli()
