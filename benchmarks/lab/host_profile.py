"""Where the host's time goes in one BLA Triton forward+backward (B=4, T=8192, H=16, d=64, W=512, m=64).

Prints the host's time to issue a forward, a backward and both (a sync before each, none after),
the torch profiler's CPU-side ops by self time, and cProfile's functions by cumulative time.
"""

import cProfile
import pstats
import torch
from timing import host_ms
from torch.profiler import ProfilerActivity, profile

from bla.kernels import bla_attention

B, T, H, d = 4, 8192, 16, 64
q, k, v = [torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]
do = torch.randn_like(q)


def fwd():
    return bla_attention(q, k, v, 512, 64, backend="triton", validate_values=False)[0]


for _ in range(5):
    fwd().backward(do)
torch.cuda.synchronize()
print(f"host fwd {host_ms(fwd):.3f} ms")
outs = [fwd() for _ in range(21)]  # host_ms: one warm-up call, then 20
it = iter(outs)
print(f"host bwd {host_ms(lambda: next(it).backward(do)):.3f} ms")
print(f"host fwd+bwd {host_ms(lambda: fwd().backward(do)):.3f} ms")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        fwd().backward(do)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
pr = cProfile.Profile()
pr.enable()
for _ in range(20):
    fwd().backward(do)
pr.disable()
torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("cumtime").print_stats(30)
