"""``bla train [PRESET|config.yaml] [key=value ...]``; with no arguments, the main job."""

from __future__ import annotations

import argparse
import os
import sys

from .config import load_train_config


def _train(args) -> int:
    from .lock import OutDirLocked
    from .trainer import TrainingStopped, run, shutdown_distributed

    config, overrides = args.config, list(args.override)
    if "=" in config:  # `bla train steps=10`: no preset named, only overrides
        config, overrides = "main", [config, *overrides]
    cfg = load_train_config(config, overrides)
    try:
        run(cfg)  # writes summary.json; a bad config raises, an interrupted run returns normally
    except (OutDirLocked, TrainingStopped) as exc:  # another run holds out_dir; non-finite losses
        print(f"bla train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    return 0


def add_train_commands(sub) -> None:
    from .config import settings_help

    p = sub.add_parser(
        "train", help="pretrain (default: a small BLA LM on the embedded corpus)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (key=value; the defaults below, before a preset's own values):\n" + settings_help() +
               "\n  model.*  see docs/presets.md (e.g. model.preset=350m model.bla.slots=32)",
    )  # fmt: skip
    p.add_argument("config", nargs="?", default="main", help="preset (main, tiny) or a YAML file")
    p.add_argument("override", nargs="*", help="key=value overrides, e.g. steps=1000 model.bla.slots=32")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    p.set_defaults(func=_train)


def main(argv: list[str] | None = None) -> int:
    """Entry point for launchers: ``torchrun ... -m bla.train.cli [config] [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="bla train")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as exc:  # bad config or data: say what, exit 2
        print(f"bla train: error: {exc}", file=sys.stderr)
        return 2


def _exit(code: int) -> None:
    """Exit with ``code``. A launcher's worker (WORLD_SIZE > 1) skips the interpreter's teardown:
    threads that gloo and DeepSpeed leave behind even after the process group is destroyed can
    abort a run that finished ("terminate called without an active exception", exit -6: seen once
    in CI's ZeRO-3 test after its checkpoint and summary were written), failing its launcher.
    Everything the run writes is closed by then (checkpoints, summary, TensorBoard)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
