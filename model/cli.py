"""``bla model ...``: inspect presets (parameters, FLOPs per token, state size)."""

from __future__ import annotations

from .config import apply_overrides, load_preset, preset_names
from .stats import flops_per_token, param_count, state_size


def _info(args) -> int:
    names = args.preset or preset_names()
    header = f"{'preset':>8} {'params':>10} {'layers':>6} {'width':>6} {'heads':>5} {'m':>4} {'W':>6} " \
             f"{'GFLOP/tok@T':>12} {'state@T':>10}"  # fmt: skip
    print(f"context T = {args.seq_len}, state in bf16 bytes per sequence")
    print(header)
    for name in names:
        cfg = apply_overrides(load_preset(name), args.override)
        st = state_size(cfg, args.seq_len, bytes_per_element=2)
        print(
            f"{name:>8} {param_count(cfg) / 1e6:>9.1f}M {cfg.n_layers:>6} {cfg.d_model:>6} {cfg.n_heads:>5} "
            f"{cfg.bla.slots:>4} {str(cfg.bla.window):>6} {flops_per_token(cfg, args.seq_len) / 1e9:>12.2f} "
            f"{st['bytes'] / 2**20:>8.2f}MiB"
        )
    return 0


def add_model_commands(sub) -> None:
    p = sub.add_parser("model", help="model presets and their accounting")
    msub = p.add_subparsers(dest="model_command", required=True)
    info = msub.add_parser("info", help="parameters, training FLOPs per token and state size of presets")
    info.add_argument("--preset", action="append", help="preset name or YAML path (repeatable; default: all)")
    info.add_argument("--seq-len", type=int, default=2048)
    info.add_argument("override", nargs="*", help="key=value config overrides")
    info.set_defaults(func=_info)
