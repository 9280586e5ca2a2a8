"""The kernel replaced in issue 17, timed like kernel_sweep.py. Extract it first:
git show af065ed:kernels/triton_bla.py | sed 's/^from \\.checks/from bla.kernels.checks/;
  s/^from \\.gates import GATE_CODES, dirichlet_gates/from bla.kernels.gates import GATES, dirichlet_gates\
GATE_CODES = {name: i for i, name in enumerate(GATES)}/' > .whl/triton_bla_old.py
"""
import sys, torch
sys.path.insert(0, ".whl")
import triton_bla_old as old
from bla.kernels.checks import check_problem
from triton.testing import do_bench
B, T, H, d, m, W = 4, 8192, 16, 64, 64, 512
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = [torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)]
do = torch.randn_like(q)
f = lambda: old.bla_triton(q, k, v, check_problem(q, k, v, W, m, None, None, None, 0), None)[0]
def fb():
    f().backward(do)
print(f"OLD kernel W={W} m={m}: fwd {do_bench(f, warmup=5, rep=50):.3f} ms fwd+bwd {do_bench(fb, warmup=5, rep=50):.3f} ms", flush=True)
