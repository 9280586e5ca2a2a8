"""The Triton kernels' relative error (output and gradients) against the float64 reference at
the Zoology-faithful MQAR shape of one layer (T = 256, W = 256, m = 64, d = 64, dirichlet), in
fp32 and bf16: run under two trees to compare them (issue 44: plain BLA's MQAR drop between
0fbd70a and 3b898fa), e.g. with the interpreter on the CPU, or on a GPU at the training batch:
    PYTHONPATH=<tree with bla/> TRITON_INTERPRET=1 python benchmarks/lab/kernel_bf16_error.py
    PYTHONPATH=<tree with bla/> python benchmarks/lab/kernel_bf16_error.py 64   # rows of the batch
"""

import faulthandler
import os
import sys

import torch

from bla.kernels import bla_attention

if os.environ.get("DUMP_AFTER_S"):  # a run that hangs prints every thread's stack and exits
    faulthandler.dump_traceback_later(float(os.environ["DUMP_AFTER_S"]), exit=True)
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
B, T, H, d = int(sys.argv[1]) if len(sys.argv) > 1 else 2, 256, 2, 64
q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64, device=device) for _ in range(3))
grad_out = torch.randn(B, T, H, d, dtype=torch.float64, device=device)


def run(dtype, backend):
    xs = [x.detach().clone().to(dtype).requires_grad_() for x in (q, k, v)]
    o, _ = bla_attention(*xs, 256, 64, gates="dirichlet", backend=backend)
    o.backward(grad_out.to(dtype))
    return [o.double()] + [x.grad.double() for x in xs]


ref = run(torch.float64, "reference")
for dtype in (torch.float32, torch.bfloat16):
    got = run(dtype, "triton")
    print(dtype, " ".join(f"{n} {((g - r).norm() / r.norm()).item():.2e}" for n, g, r in zip(("o", "dq", "dk", "dv"), got, ref)))
