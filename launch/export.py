"""``bla export``: a checkpoint (or an earlier export) to the export format of ``bla.train.export``."""

from __future__ import annotations

from bla.train.export import DTYPES, export


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint to safetensors + a Hugging Face model directory")
    p.add_argument("source", help="run directory, checkpoint directory (any ZeRO stage), or an earlier export")
    p.add_argument("out", help="directory to write")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory at OUT")

    def run(args) -> int:
        path = export(args.source, args.out, args.dtype, args.overwrite)
        print(f"exported {args.source} -> {path}")
        return 0

    p.set_defaults(func=run)
