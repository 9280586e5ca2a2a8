"""Peak memory and time of the training loss through the head: plain logits against chunks.

``python benchmarks/loss.py --tokens 16384 --vocab 32000 --dim 1024 --chunks 0 2048 512``
Each setting runs forward + backward of ``hidden [tokens, dim] -> logits [tokens, vocab] -> mean
cross-entropy`` in a process of its own, so its peak memory is its own: on a GPU
``torch.cuda.max_memory_allocated``, on the CPU the process's peak resident set (less the
inputs'). Chunk 0 is the plain path (``cross_entropy((h @ W.T).float())``). Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _one(tokens: int, vocab: int, dim: int, chunk: int, dtype: str, device: str) -> dict:
    import resource

    import torch

    from bla.model.loss import linear_cross_entropy

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    h = torch.randn(tokens, dim, dtype=dt, device=device, requires_grad=True)
    w = (torch.randn(vocab, dim, dtype=dt, device=device) * dim**-0.5).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sync()
    t0 = time.perf_counter()
    if chunk:
        loss = linear_cross_entropy(h, w, y, chunk)
    else:
        loss = torch.nn.functional.cross_entropy((h @ w.t()).float(), y)
    loss.backward()
    sync()
    seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return dict(tokens=tokens, vocab=vocab, dim=dim, chunk=chunk, dtype=dtype, device=device, loss=float(loss),
                seconds=seconds, peak_bytes=peak)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/loss.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 2048, 512], help="0 = plain logits (2048: the trainer's default)")
    p.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", default="")
    p.add_argument("--json", default="loss_benchmark.json")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one setting
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.tokens, args.vocab, args.dim, args.chunks[0], args.dtype, args.device)))
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    rows = []
    print(f"{'chunk':>6} {'peak MB':>9} {'seconds':>8} {'loss':>9}   ({args.tokens} tokens, vocab {args.vocab}, dim {args.dim}, {dtype}, {device})")
    for chunk in args.chunks:
        cmd = [sys.executable, __file__, "--one", "--tokens", str(args.tokens), "--vocab",
               str(args.vocab), "--dim", str(args.dim), "--chunks", str(chunk), "--dtype", dtype, "--device", device]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{chunk:>6} {row['peak_bytes'] / 2**20:>9.0f} {row['seconds']:>8.2f} {row['loss']:>9.5f}")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
