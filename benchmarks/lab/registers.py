"""Registers and spills of the BLA Triton kernels, compiled for Hopper (sm_90) on any machine: no GPU
needed (Triton's bundled ptxas), so a register-pressure change can be judged before device time.

The kernels' arguments are captured from a real forward and backward on CPU tensors (their launches
replaced), so the signatures and constants are exactly those the GPU gets. Prints one line per kernel.

    python benchmarks/lab/registers.py [--window 512] [--slots 64] [--dtype bfloat16]

Triton's version here may differ from the GPU machine's, and registers and spills with it (at m = 128
the stack bytes of Triton 3.9 and 3.6 differed by up to 60%): the device's own Triton installs beside it,
`pip install --target /tmp/t36 --no-deps triton==3.6.0`, and runs with `PYTHONPATH=/tmp/t36`.
"""

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import bla.kernels.triton_bla as tb
import bla.kernels.triton_plan as plans
import bla.kernels.triton_scan as scans
from bla.kernels.checks import check_problem

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
KERNELS = ["_fwd_local_kernel", "_scan_kernel", "_fwd_out_kernel", "_bwd_chunk_kernel", "_bwd_tokens_kernel"]
TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}


class _Capture:
    """Stands in for a kernel: records its first launch's arguments."""

    def __init__(self, fn, seen):
        self.fn, self.seen = fn, seen
        self.arg_names = fn.arg_names  # what the kernels' launcher reads

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.setdefault(self.fn.__name__, (self.fn, args, kwargs))

        return launch


def capture(W: int, m: int, dtype: torch.dtype, B=1, T=2048, H=4, d=64) -> dict:
    seen = {}
    for name in KERNELS:  # each where it is launched from
        where = scans if name == "_scan_kernel" else tb
        setattr(where, name, _Capture(getattr(where, name), seen))
    plans.INTERPRETING = False  # the GPU's operand dtypes
    q, k, v = (torch.randn(B, T, H, d, dtype=dtype) for _ in range(3))
    p = check_problem(q, k, v, W, m, None, None, None, 0, "dirichlet", False)
    o, _, _, saved = tb.forward(q, k, v, None, None, p)
    tb.backward(torch.randn_like(o), None, None, q, k, v, o, saved, p, False)
    return seen


def compile_sm90(fn, args, kwargs) -> tuple[int, int]:
    """Registers a thread and stack bytes (spills) of ``fn`` compiled for sm_90 with these arguments."""
    names = fn.arg_names
    values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs = {}, {}
    for name in names:
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = TYPES[value.dtype]
        elif name in [fn.arg_names[i] for i in fn.constexprs]:
            signature[name] = "constexpr"
            constexprs[(names.index(name),)] = value
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn, signature, constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:  # registers and spills as ptxas left them in the binary
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(re.search(r"STACK:(\d+)", usage).group(1))
    return regs, spills


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--maxnreg", type=int, help="cap the registers a thread (ptxas spills the rest)")
    ap.add_argument("--kernels", help="compile only these, comma-separated (e.g. _bwd_chunk_kernel): each takes 10-40 s")
    args = ap.parse_args()
    seen = capture(args.window, args.slots, getattr(torch, args.dtype))
    wanted = args.kernels.split(",") if args.kernels else list(seen)
    unknown = sorted(set(wanted) - set(seen))
    if unknown:
        raise SystemExit(f"--kernels: {', '.join(unknown)} not launched by this problem; it launches {', '.join(seen)}")
    for name, (fn, a, kw) in ((name, seen[name]) for name in wanted):
        if args.maxnreg:
            kw = dict(kw, maxnreg=args.maxnreg)
        regs, spills = compile_sm90(fn, a, kw)
        print(f"{name:<22} registers {regs:4d}  stack bytes {spills:5d}  ({kw.get('num_warps')} warps)", flush=True)


if __name__ == "__main__":
    main()
