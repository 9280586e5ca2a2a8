"""Operator benchmarks: ``python benchmarks/kernel.py --help``.

``cpu``: throughput of the torch (chunked) backend on the CPU, forward and forward+backward.
``gpu``: BLA's Triton backend against causal SDPA (flash), sliding-window attention
(flex_attention) and fla's chunk_gsa when installed, across T, m and d; first-call times.
Both print a table and write JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kernel_gpu import add_gpu_parser  # beside this script

from bla.kernels import bla_attention


def _time_cpu(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_benchmark(args) -> list[dict]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    rows = []
    for backend in args.backends:
        B, T, H, d, m, W = args.batch, args.seq_len, args.heads, args.head_dim, args.slots, args.window
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, T, H, d, generator=gen).requires_grad_() for _ in range(3))

        def fwd():
            with torch.no_grad():
                bla_attention(q, k, v, W, m, backend=backend)

        def fwd_bwd():
            o, _ = bla_attention(q, k, v, W, m, backend=backend)
            o.sum().backward()

        t_f = _time_cpu(fwd, args.repeats)
        t_fb = _time_cpu(fwd_bwd, args.repeats) if backend != "reference" else float("nan")
        rows.append(dict(backend=backend, B=B, T=T, H=H, d=d, m=m, W=W, threads=torch.get_num_threads(),
                         fwd_s=t_f, fwd_bwd_s=t_fb, fwd_tok_s=B * T / t_f, fwd_bwd_tok_s=B * T / t_fb))  # fmt: skip
    print(f"{'backend':>10} {'B':>3} {'T':>6} {'H':>3} {'d':>4} {'m':>4} {'W':>5} {'fwd tok/s':>11} {'fwd+bwd tok/s':>14}")
    for r in rows:
        print(f"{r['backend']:>10} {r['B']:>3} {r['T']:>6} {r['H']:>3} {r['d']:>4} {r['m']:>4} {r['W']:>5} "
              f"{r['fwd_tok_s']:>11.0f} {r['fwd_bwd_tok_s']:>14.0f}")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/kernel.py", description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    cpu = sub.add_parser("cpu", help="torch backend throughput on the CPU")
    cpu.add_argument("--batch", type=int, default=1)
    cpu.add_argument("--seq-len", type=int, default=4096)
    cpu.add_argument("--heads", type=int, default=4)
    cpu.add_argument("--head-dim", type=int, default=64)
    cpu.add_argument("--slots", type=int, default=32)
    cpu.add_argument("--window", type=int, default=512)
    cpu.add_argument("--repeats", type=int, default=5)
    cpu.add_argument("--threads", type=int, default=0)
    cpu.add_argument("--backends", nargs="+", default=["torch"])
    cpu.add_argument("--json", default="bench_cpu.json")
    add_gpu_parser(sub)
    args = parser.parse_args(argv)
    rows = cpu_benchmark(args) if args.mode == "cpu" else args.run(args)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.node(), processor=platform.processor(),
                torch=torch.__version__, cpu_count=torch.get_num_threads())  # fmt: skip
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
