"""BLA Triton forward and forward+backward at B=4, T=8192, H=16, d=64, m=64 (argv: W); the
kernel's knobs come from the environment (BLA_TRITON_SUB, BLA_TRITON_WARPS, ...); PROF=1 adds
a torch-profiler table of CUDA kernel times. Used for benchmarks/reports/2026-11-to-12.md."""
import os, sys, torch
from torch.profiler import profile, ProfilerActivity
from bla.kernels import bla_attention
from triton.testing import do_bench
B, T, H, d, m = 4, 8192, 16, 64, 64
W = int(sys.argv[1]) if len(sys.argv) > 1 else 512
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = [torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)]
do = torch.randn_like(q)
f = lambda: bla_attention(q, k, v, W, m, backend="triton")[0]
def fb():
    f().backward(do)
fwd, fwdbwd = do_bench(f, warmup=5, rep=30), do_bench(fb, warmup=5, rep=30)
print(f"W={W} seg={os.environ.get('BLA_TRITON_SEGMENT')} warps={os.environ.get('BLA_TRITON_WARPS')} stages={os.environ.get('BLA_TRITON_STAGES')}: fwd {fwd:.3f} ms fwd+bwd {fwdbwd:.3f} ms", flush=True)
if os.environ.get("PROF"):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fb()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))
