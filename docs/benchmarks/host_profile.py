"""Where the host's time goes in one eager BLA forward+backward (B=4, T=8192, H=16, d=64, W=512,
m=64, bf16): cProfile over many calls, the backward on the calling thread (autograd's worker
threads are invisible to cProfile), top functions by own time; then the host time of each call
with and without that setting."""

import cProfile
import pstats
import sys

import torch
from timing import host_ms

from bla.kernels import bla_attention

B, T, H, d, W, m = 4, 8192, 16, 64, 512, 64
CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
q, k, v = [torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]
do = torch.randn_like(q)


def step():
    bla_attention(q, k, v, W, m, backend="triton", validate_values=False)[0].backward(do)


print(f"host ms per forward+backward (worker thread): {host_ms(step):.3f}")
with torch.autograd.set_multithreading_enabled(False):
    print(f"host ms per forward+backward (calling thread): {host_ms(step):.3f}")
    step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(CALLS):
        step()
    prof.disable()
    torch.cuda.synchronize()
stats = pstats.Stats(prof)
stats.sort_stats("tottime").print_stats(30)
stats.sort_stats("cumulative").print_stats(30)
