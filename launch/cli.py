"""The ``bla`` command: one entry point, a subcommand per part of the stack."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # said before the subcommands' imports (seconds)
        print(_version_line())
        return 0
    parser = argparse.ArgumentParser(prog="bla", description="bla-lm: pretraining LMs on Blurry Window Attention")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    from bla.data.cli import add_data_commands
    from bla.model.cli import add_model_commands
    from bla.eval.cli import add_eval_commands
    from bla.launch.export import add_export_command
    from bla.launch.sweep import add_sweep_command
    from bla.launch.run import add_launch_commands
    from bla.train.cli import add_train_commands

    add_model_commands(sub)
    add_data_commands(sub)
    add_train_commands(sub)
    add_launch_commands(sub)
    add_eval_commands(sub)
    add_export_command(sub)
    add_sweep_command(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):  # only commands that hand flags on take unknown ones
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # bad input: say what and exit 2, as argparse does
        print(f"bla {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"bla-lm {version('bla-lm')}"
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "bla-lm unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
