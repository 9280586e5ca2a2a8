"""Issue 19's GPU nondeterminism, located: does the same computation give the same bits twice?

`deterministic=true` runs of BLA on MQAR part between processes on an H200 (experiments/reports/2026-11-to-12-sweeps.md). The
bisect of `gpu_run.sh repeat` found: compiled bf16 with the Triton backend parts (at step 8), eager
(compile=false) parts at step 1; the torch backend and fp32 repeat. This script repeats, inside
one process, (a) the BLA operator alone (forward and forward+backward) and (b) the MQAR model's
eager loss and gradients, each N times on the same inputs, and counts the repeats whose bits
differ from the first. With --load, a second process keeps the GPU busy meanwhile (as a sweep's
other jobs do). With --poison, torch's deterministic mode fills every new tensor with NaN (as
`deterministic=true` does; regbench_v2's BLA runs went non-finite at step 2 with it): the script
then also reports NaN in the outputs, the gradients and the forward's saved buffers at the
RegBench shape (d = 32) and the MQAR shape. Run on the GPU machine:

    python benchmarks/lab/determinism.py [--repeats 20] [--load] [--poison]

What it found (benchmarks/reports/2026-11-to-12.md): Triton miscompiled the 16-slot tiles that m <= 16 ran as;
since 8ef46b2 every m <= 64 runs as a 64-slot tile. `BLA_TRITON_TUNE=slot_block=16` brings the small
tiles back, to see the failure again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from bla.kernels import bla_attention, triton_bla
from bla.kernels.checks import check_problem
from bla.model import BLALM, ModelConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU (TRITON_INTERPRET=1) only checks the script itself
LOAD = "import torch\nx = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)\nwhile True: x = (x @ x).tanh()\n"


def _bits(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _differs(a, b) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a, b))


def repeat(fn, n: int) -> dict:
    first = _bits(fn())
    diffs = [i for i in range(1, n) if _differs(first, _bits(fn()))]
    nan = any(bool(t.isnan().any()) for t in first if t.is_floating_point())
    return {"repeats": n, "differing": len(diffs), "first_differing": diffs[0] if diffs else None, "nan": nan}


def operator_case(dtype, B, T, H, d, m, W, backward: bool, gates: str = "dirichlet"):
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, device=DEV, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, T, H, d, device=DEV, dtype=dtype, generator=g)

    def fn():
        for x in (q, k, v):
            x.grad = None
        o, _ = bla_attention(q, k, v, W, m, backend="triton", gates=gates)
        if not backward:
            return [o]
        o.backward(do)
        return [o, q.grad, k.grad, v.grad]

    return fn


def model_case(dtype, heads: int = 2, layers: int = 2, slots: int = 16, window: int = 128, B: int = 64):
    """The eager model's loss and gradients (the repeat stage's failing runs were eager from step 1)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"vocab_size": 256, "d_model": 128, "n_layers": layers, "n_heads": heads, "layer_pattern": ["bla"],
                                 "tie_embeddings": False, "bla": {"slots": slots, "window": window, "short_conv": 4}})  # fmt: skip
    model = BLALM(cfg).to(DEV).to(dtype)
    ids = torch.randint(0, 256, (B, window), device=DEV)

    def fn():
        model.zero_grad(set_to_none=True)
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        return [loss] + [p.grad for p in model.parameters() if p.grad is not None]

    return fn


def nan_report(dtype, B, T, H, d, m, W) -> dict:
    """NaN in the Triton operator's outputs, gradients and saved buffers (call it with --poison)."""
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, d, device=DEV, dtype=dtype, generator=g) for _ in range(4))
    p = check_problem(q, k, v, W, m, None, None, None, 0, "dirichlet")
    o, hk, hv, saved = triton_bla.forward(q, k, v, None, None, p)
    dq, dk, dv, _, _ = triton_bla.backward(do, None, None, q, k, v, o, saved, p, False)
    names = ["o", "hk", "hv", "ck", "cv", "before", "chunk_dec", "seg_k", "seg_v", "seg_dec", "lse", "dq", "dk", "dv"]
    return {n: int(t.isnan().sum()) for n, t in zip(names, [o, hk, hv, *saved, dq, dk, dv])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--load", action="store_true", help="a second process keeps the GPU busy meanwhile")
    ap.add_argument("--poison", action="store_true", help="new tensors start as NaN (torch's deterministic mode)")
    ap.add_argument("--nan-only", action="store_true", help="with --poison: only the NaN report")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.poison:
        torch.use_deterministic_algorithms(True, warn_only=True)  # also fills torch.empty with NaN
        for dtype in (torch.bfloat16, torch.float32):
            for shape in ((32, 256, 4, 32, 16, 256), (32, 256, 4, 32, 4, 256), (32, 256, 4, 32, 64, 256), (64, 128, 2, 64, 16, 128)):
                print(f"NaN count, {dtype} B,T,H,d,m,W={shape}:", nan_report(dtype, *shape), flush=True)
        if args.nan_only:
            return
    load = subprocess.Popen([sys.executable, "-c", LOAD]) if args.load else None
    rows = []
    try:
        cases = []
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).split(".")[-1]
            for shape in ((64, 128, 2, 64, 16, 128), (4, 8192, 16, 64, 64, 512))[: 2 if DEV == "cuda" else 1]:
                for bwd in (False, True):
                    label = f"operator {name} B,T,H,d,m,W={shape} {'fwd+bwd' if bwd else 'fwd'}"
                    cases.append((label, operator_case(dtype, *shape, backward=bwd)))
            cases.append((f"model {name} eager", model_case(dtype)))
            cases.append((f"model {name} eager, RegBench shape (d=32, 4 layers, W=256)", model_case(dtype, 4, 4, 16, 256, 32)))
        for label, fn in cases:
            row = {"case": label, **repeat(fn, args.repeats)}
            rows.append(row)
            print(f"{label:70s} {row['differing']:3d} of {row['repeats'] - 1} repeats differ"
                  + (f" (first: repeat {row['first_differing']})" if row["differing"] else "") + (" NaN" if row["nan"] else ""), flush=True)
    finally:
        if load is not None:
            load.kill()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "load": args.load, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
