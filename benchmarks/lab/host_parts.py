"""The host's time per part of one BLA Triton call (B=4, T=8192, H=16, d=64, W=512, m=64), in ms:
the raw launch code (triton_bla.forward / backward), the custom operator without and with
autograd, one Triton launch of a small kernel, and a small torch allocation and fill."""

import torch
from timing import host_ms

from bla.kernels import bla_attention
from bla.kernels.checks import check_problem
from bla.kernels import triton_bla, triton_scan
from bla.kernels.triton_ops import chunk_fwd

B, T, H, d, W, m = 4, 8192, 16, 64, 512, 64
q, k, v = [torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]
do = torch.randn_like(q)
p = check_problem(q, k, v, W, m, None, None, None, 0, "dirichlet", False)


o, hk, hv, saved = triton_bla.forward(q.detach(), k.detach(), v.detach(), None, None, p)
x = torch.zeros(64, 16, 64, 64, device="cuda")
parts = {
    "triton_bla.forward (raw launches)": lambda: triton_bla.forward(q.detach(), k.detach(), v.detach(), None, None, p),
    "triton_bla.backward (raw launches)": lambda: triton_bla.backward(do, None, None, q, k, v, o, saved, p, False),
    "chunk_fwd op, no grad": lambda: chunk_fwd(q.detach(), k.detach(), v.detach(), None, None, None, p.offset, list(p.windows), m, p.scale, "dirichlet", [0] * len(p.windows)),
    "chunk_fwd op forward+backward (the compiled path's op)": lambda: chunk_fwd(q, k, v, None, None, None, p.offset, list(p.windows), m, p.scale, "dirichlet", [0] * len(p.windows))[0].backward(do),
    "check_problem": lambda: check_problem(q, k, v, W, m, None, None, None, 0, "dirichlet", False),
    "bla_attention forward, grad": lambda: bla_attention(q, k, v, W, m, backend="triton", validate_values=False),
    "bla_attention forward+backward (eager: _Chunk)": lambda: bla_attention(q, k, v, W, m, backend="triton", validate_values=False)[0].backward(do),
    "one _scan_kernel launch": lambda: triton_scan.scan(x, x, x[..., 0].contiguous(), None, None, torch.zeros(64, dtype=torch.int32, device="cuda"), torch.ones(64, dtype=torch.int32, device="cuda"), 64, reverse=False),
    "torch.zeros(4 MB)": lambda: torch.zeros(64, 16, 64, 64, device="cuda"),
    "torch.empty(4 MB)": lambda: torch.empty(64, 16, 64, 64, device="cuda"),
}
for name, fn in parts.items():
    print(f"{name:<56} {host_ms(fn):7.3f} ms")
