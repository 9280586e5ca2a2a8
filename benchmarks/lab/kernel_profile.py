"""Where the BLA Triton kernels spend their time (used for benchmarks/reports/2026-11-to-12.md).

B=4, T=8192, H=16, d=64, bf16 (argv: W m). Prints do_bench medians of the forward and of
forward+backward, the CUDA time of every kernel of one forward and of one backward (torch
profiler, mean of 5 calls), and each Triton kernel's registers, spills and shared memory.
With NCU=1 it runs one forward+backward only (for `ncu`, which replays each kernel).
"""

import os
import sys
import torch
import triton.runtime.jit as jit
from timing import kernel_times
from triton.testing import do_bench

from bla.kernels import bla_attention

resources = {}
_run = jit.JITFunction.run


def _recording_run(self, *args, **kwargs):
    kernel = _run(self, *args, **kwargs)
    if kernel is not None:
        resources[self.fn.__name__] = (kernel.n_regs, kernel.n_spills, kernel.metadata.shared)
    return kernel


jit.JITFunction.run = _recording_run

B, T, H, d = 4, 8192, 16, 64
W = int(sys.argv[1]) if len(sys.argv) > 1 else 512
m = int(sys.argv[2]) if len(sys.argv) > 2 else 64
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = [torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)]
do = torch.randn_like(q)


def fwd():
    return bla_attention(q, k, v, W, m, backend="triton")[0]


if os.environ.get("NCU"):
    fwd().backward(do)
    torch.cuda.synchronize()
    sys.exit(0)

t_f = do_bench(fwd, warmup=10, rep=50)
t_fb = do_bench(lambda: fwd().backward(do), warmup=10, rep=50)
print(f"W={W} m={m}: forward {t_f:.3f} ms, forward+backward {t_fb:.3f} ms")


with torch.no_grad():
    t_fwd = kernel_times(fwd)
outs = [fwd() for _ in range(5)]
it = iter(outs)
t_bwd = kernel_times(lambda: next(it).backward(do))
for name, times in (("forward (no grad)", t_fwd), ("backward", t_bwd)):
    print(f"{name}: {sum(times.values()):.3f} ms of kernels")
    for kname, ms in sorted(times.items(), key=lambda x: -x[1]):
        print(f"  {kname:<48} {ms:7.3f} ms")
print("kernel resources (registers/thread, spilled registers, shared bytes):")
for kname, (regs, spills, shared) in sorted(resources.items()):
    print(f"  {kname:<28} regs={regs} spills={spills} shared={shared}")
