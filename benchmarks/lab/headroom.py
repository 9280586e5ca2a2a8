"""How large q . k may grow before the centred pair form overflows, for a reset floor (CPU, fp32).

The centred form factorises a sub-chunk's pairs on each slot's mid log-decay, so its factors reach
e^(spread / 2); the reset floor (``LOG_FLOOR``) adds to that spread. This forces the centred form
at W=4096, m=64 (``FACTOR_LOG_RANGE`` lifted) for each floor given, puts a slot's reset in the
middle of every sub-chunk (offset 32: the widest spread) and compares the Triton kernels (fp32,
TRITON_INTERPRET=1 on CPU) with the float64 torch backend as |q . k| grows: finite or not, and the
largest error relative to the largest value of o, dq, dk, dv.

    TRITON_INTERPRET=1 python benchmarks/lab/headroom.py --floors -20 -26 -30
"""

import argparse

import torch

import bla.kernels.triton_plan as plans
import bla.kernels.triton_tables as tb
from bla.kernels import bla_attention
from bla.kernels.checks import check_problem

W, M, T, D = 4096, 64, 140, 64


def run(sigma: float) -> tuple[float, bool, float]:
    g = torch.Generator().manual_seed(0)
    q, k = (sigma * torch.randn(1, T, 1, D, generator=g) for _ in range(2))
    v, cot = (torch.randn(1, T, 1, D, generator=g) for _ in range(2))
    res = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        o = bla_attention(*leaves, W, M, backend=backend, offset=torch.tensor([32]))[0]
        res[backend] = [x.detach() for x in (o, *torch.autograd.grad(o, leaves, cot.to(dtype)))]
    finite = all(bool(torch.isfinite(a).all()) for a in res["triton"])
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(res["triton"], res["torch"]))
    return float((q[0, :, 0] @ k[0, :, 0].T).abs().max()), finite, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--floors", type=float, nargs="+", default=[-20.0, -26.0, -30.0])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1, 8, 24, 64], help="q and k entries' scale")
    args = ap.parse_args()
    tb.FACTOR_LOG_RANGE = 1e9  # one centre whatever the spread
    print(f"{'floor':>6} {'spread':>7} {'sigma':>6} {'max |q.k|':>10} {'finite':>7} {'rel err':>9}")
    for floor in args.floors:
        tb.LOG_FLOOR = floor
        for cached in (f for f in vars(tb).values() if hasattr(f, "cache_clear")):  # every table of the old floor
            cached.cache_clear()
        plans.PLANS.clear()  # the plans hold their tables too
        spread = tb.diag_log_range((W,), M, "dirichlet", 64)
        x = torch.zeros(1, 1, 1, D)
        assert tb.sub_chunking(check_problem(x, x, x, W, M, None, None, None, 0, "dirichlet")) == (64, tb.CENTRED)
        for sigma in args.sigmas:
            qk, finite, err = run(sigma)
            print(f"{floor:6.0f} {spread:7.1f} {sigma:6g} {qk:10.0f} {str(finite):>7} {err:9.1e}", flush=True)


if __name__ == "__main__":
    main()
