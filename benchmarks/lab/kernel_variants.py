"""The BLA Triton kernels' tuning variants side by side, in one process (used for benchmarks/reports/2026-11-to-12.md).

B=4, T=8192 (or the set's own shape, or ``--shape B T``), H=16, d=64, bf16. Each variant is (W, m, environment knobs of kernels/triton_bla.py);
the knobs are read per call, so every variant runs in the same process and run. For each: do_bench
medians of the forward and of forward+backward; the kernels' CUDA time of one forward+backward
(torch profiler, mean of 5); the host's time to issue one forward+backward (no synchronisation);
and flex-attention SWA at the same W beside it; a variant with knobs set also reports how far its
output and gradients are from the default knobs' (max |difference| / max |default|: a knob
changes the schedule, not the result). ``--dtype float32`` runs fp32 inputs (the products in
tf32), where that distance is rounding, not bf16's. Prints a table; ``--json PATH`` writes it.

    python benchmarks/lab/kernel_variants.py --json kernel_variants.json
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from timing import host_ms, kernel_times
from triton.testing import do_bench

from bla.kernels import bla_attention
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: kernel_gpu
from kernel_gpu import _flex_swa_fn  # noqa: E402
from bla.kernels import triton_tuning as tuning
from bla.kernels.triton_tables import sub_chunking
from bla.kernels.checks import check_problem

H, d = 16, 64
VARIANTS = [  # (W, m, knobs); 030793b's run also had SUB=128 (4 and 8 warps) and halves at W=512, 8 warps at W=4096
    (512, 64, {}),
    (4096, 64, {"BLA_TRITON_PAIRS": "centred"}),
    (4096, 64, {}),
    (512, 128, {}),
    (512, 32, {}),
    # m >= 128 (issue 17: m = 128 at most 2x m = 64): smaller sub-chunks and fewer warps, whose
    # [S, m] tiles may not spill as [64, 128] at 8 warps did
    (512, 128, {"BLA_TRITON_SUB": "32"}),
    (512, 128, {"BLA_TRITON_WARPS": "4"}),
    (512, 128, {"BLA_TRITON_SUB": "32", "BLA_TRITON_WARPS": "4"}),
    (4096, 128, {}),
    (4096, 128, {"BLA_TRITON_SUB": "32"}),
    (512, 256, {}),
    (512, 256, {"BLA_TRITON_SUB": "16"}),
    # m <= 16 runs as 64-slot tiles (a Triton miscompile of smaller ones): what that costs
    (512, 16, {}),
    (512, 4, {}),
]
SCAN_VARIANTS = [  # run at f9bbe0a, whose default was 16 scan rows a program, against one program per state (rows = BM)
    (512, 64, {}),
    (512, 64, {"BLA_TRITON_SCAN_ROWS": "64"}),
    (512, 64, {"BLA_TRITON_SCAN_ROWS": "32"}),
    (4096, 64, {}),
    (512, 128, {}),
    (512, 128, {"BLA_TRITON_SCAN_ROWS": "128", "BLA_TRITON_WARPS": "8"}),
    (512, 256, {}),
    (512, 256, {"BLA_TRITON_SCAN_ROWS": "256"}),
    (512, 16, {}),
]
SCAN_ROWS_VARIANTS = [  # after the first scan run: the rows per program at m >= 128 (64 slots and below keep one program per state)
    (512, 64, {}),
    (512, 128, {"BLA_TRITON_SCAN_ROWS": "64"}),
    (512, 128, {"BLA_TRITON_SCAN_ROWS": "32"}),
    (512, 256, {"BLA_TRITON_SCAN_ROWS": "64"}),
    (512, 256, {"BLA_TRITON_SCAN_ROWS": "32"}),
]
SCAN_GROUP_VARIANTS = [  # the two-level segment scan (BLA_TRITON_SCAN_GROUP) at B=1, T=131,072: 128 segments a sequence
    # ({} is the default rule: at 956ee83 one level, since then two levels of G = 8 from 64 segments)
    (512, 64, {}),
    (512, 64, {"BLA_TRITON_SCAN_GROUP": "0"}),
    (512, 64, {"BLA_TRITON_SCAN_GROUP": "8"}),
    (512, 64, {"BLA_TRITON_SCAN_GROUP": "16"}),
    (4096, 64, {}),
    (4096, 64, {"BLA_TRITON_SCAN_GROUP": "0"}),
    (4096, 64, {"BLA_TRITON_SCAN_GROUP": "8"}),
    (4096, 64, {"BLA_TRITON_SCAN_GROUP": "16"}),
    (512, 64, {"BLA_TRITON_SCAN_GROUP": "4"}),
    (4096, 64, {"BLA_TRITON_SCAN_GROUP": "4"}),
]
SLOT_TILE_VARIANTS = [  # the backward in 64-slot tiles against one tile of every slot (BLA_TRITON_SLOT_TILE=0). At
    # 48c2f6b, when it ran, one tile was the default ({}); since then 128 slots take the tiles by default
    (512, 64, {}),
    (512, 128, {}),
    (512, 128, {"BLA_TRITON_SLOT_TILE": "0"}),
    (512, 128, {"BLA_TRITON_SLOT_TILE": "64"}),
    (4096, 128, {}),
    (4096, 128, {"BLA_TRITON_SLOT_TILE": "0"}),
    (4096, 128, {"BLA_TRITON_SLOT_TILE": "64"}),
    (512, 256, {}),
    (512, 256, {"BLA_TRITON_SLOT_TILE": "64"}),
]
CUM_VARIANTS = [  # every chunked kernel reads the per-phase cumulative log-decays and the pairs' centres from tables,
    # against BLA_TRITON_CUM_MB=0 (no table: each kernel sums its log-decays and reduces its centres, as before 6455561
    # in (1) and (C), before e471272 in (3) and (A)); and at W=4096, 64-token chunks of two 32-token centred sub-chunks
    # against the halves form's one 64-token sub-chunk. f11be31's run also had BLA_TRITON_CENTRES=0 at W=512 and 4096
    # (the centres reduced in the kernels, the other tables read: a knob since removed)
    (512, 64, {}),
    (512, 64, {"BLA_TRITON_CUM_MB": "0"}),
    (512, 64, {"BLA_TRITON_LAUNCH": "jit"}),  # the host's time with every launch through Triton's JIT
    (4096, 64, {}),
    (4096, 64, {"BLA_TRITON_CUM_MB": "0"}),
    (4096, 64, {"BLA_TRITON_CHUNK": "64", "BLA_TRITON_SUB": "32", "BLA_TRITON_PAIRS": "centred"}),
    (512, 128, {}),
    (512, 128, {"BLA_TRITON_CUM_MB": "0"}),
]
REGISTER_VARIANTS = [  # registers a thread capped (ptxas spills the rest): 168 lets 3 programs of 4 warps share an SM
    # (the big kernels took 232-255, so 2), 128 lets 4; per kernel too (benchmarks/lab/registers.py shows the spills)
    (512, 64, {}),
    (512, 64, {"BLA_TRITON_MAXNREG": "168"}),
    (512, 64, {"BLA_TRITON_MAXNREG": "128"}),
    (512, 64, {"BLA_TRITON_MAXNREG": "fwd_local=168,bwd_tokens=168"}),
    (4096, 64, {}),
    (4096, 64, {"BLA_TRITON_MAXNREG": "168"}),
]
TILE_RUN_VARIANTS = [  # how (A)'s slot tiles run (BLA_TRITON_TILE_RUN), as run at f9cbbeb (default "grid" then): each
    # a program of its own, their shares of dq, dk, dv in parts that (C) sums ("grid"); one launch per tile, each
    # adding to the earlier's ("launches", the default since); one program walking them ("program", the default
    # before). The first run (88703bd) had the tiles' programs add atomically into zeroed buffers: m = 128 2.920 ->
    # 2.672 ms at W=512, 4.372 -> 3.350 at W=4096; the second (parts) also m = 256 in four 64-slot tiles: 11.728 ->
    # 12.689 ms, not taken
    (512, 64, {}),
    (512, 128, {}),
    (512, 128, {"BLA_TRITON_TILE_RUN": "launches"}),
    (512, 128, {"BLA_TRITON_TILE_RUN": "program"}),
    (4096, 64, {}),
    (4096, 128, {}),
    (4096, 128, {"BLA_TRITON_TILE_RUN": "launches"}),
    (4096, 128, {"BLA_TRITON_TILE_RUN": "program"}),
]
WARPS_128_VARIANTS = [  # m = 128 with 8 warps in some kernels: compiled offline for sm_90 (registers.py, Triton 3.6), 8
    # warps take (C)'s stack bytes 672 -> 0, (3)'s 1392 -> 576, (2)'s 240 -> 0, (A)'s 584 -> 152 (8 warps everywhere
    # was slower at 46d4c06, and in (A) at e61e223, both before (A)'s slot tiles ran apart). Run at 882423f: 4 warps stay
    (512, 64, {}),
    (512, 128, {}),
    (512, 128, {"BLA_TRITON_WARPS": "bwd_tokens=8"}),
    (512, 128, {"BLA_TRITON_WARPS": "fwd_out=8,bwd_tokens=8"}),
    (512, 128, {"BLA_TRITON_WARPS": "fwd_local=8,fwd_out=8,bwd_tokens=8"}),
    (512, 128, {"BLA_TRITON_WARPS": "8"}),
    (4096, 64, {}),
    (4096, 128, {}),
    (4096, 128, {"BLA_TRITON_WARPS": "fwd_local=8,fwd_out=8,bwd_tokens=8"}),
    (4096, 128, {"BLA_TRITON_WARPS": "8"}),
]
FACTOR_EL_VARIANTS = [  # e^l as its own [S, m] tile in (3) and (A) (BLA_TRITON_FACTOR_EL=0, as the kernels before edbc426)
    # or as A e^mid with A factored out of the pair terms (1; first run at dc9b880 with 1 everywhere, then the default
    # FACTOR_EL_OFF, so the rows named {} show the default of their tree): compiled offline for sm_90 (registers.py,
    # Triton 3.6), the factored form takes m = 128's (3) from 1392 to 544 stack bytes, (A) 584 -> 416; m = 64's
    # (3) 168 -> 64, (A) 456 -> 248
    (512, 64, {}),
    (512, 64, {"BLA_TRITON_FACTOR_EL": "fwd_out=0"}),
    (512, 64, {"BLA_TRITON_FACTOR_EL": "0"}),
    (4096, 64, {}),
    (4096, 64, {"BLA_TRITON_FACTOR_EL": "fwd_out=0"}),
    (4096, 64, {"BLA_TRITON_FACTOR_EL": "0"}),
    (512, 128, {}),
    (512, 128, {"BLA_TRITON_FACTOR_EL": "fwd_out=0"}),
    (512, 128, {"BLA_TRITON_FACTOR_EL": "0"}),
    (4096, 128, {}),
    (4096, 128, {"BLA_TRITON_FACTOR_EL": "0"}),
    (512, 256, {}),
    (512, 256, {"BLA_TRITON_FACTOR_EL": "0"}),
]
FLOOR_VARIANTS = [  # the reset floor at -20 (was -30): W=4096, m=64 takes one centre over 64 tokens (its default {}),
    # against the halves form it took before (forced); m = 128 at W=4096 with its 128 MiB table of cumulative
    # log-decays (over CUM_TABLE_BYTES, so summed in the kernels by default); W/m = 96 and 128, still in halves
    (512, 64, {}),
    (4096, 64, {}),
    (4096, 64, {"BLA_TRITON_PAIRS": "halves"}),
    (512, 128, {}),
    (4096, 128, {}),
    (4096, 128, {"BLA_TRITON_CUM_MB": "256"}),
    (6144, 64, {}),
    (8192, 64, {}),
]
SETS = {"all": VARIANTS, "scan": SCAN_VARIANTS, "scan_rows": SCAN_ROWS_VARIANTS, "scan_group": SCAN_GROUP_VARIANTS,
        "slot_tile": SLOT_TILE_VARIANTS, "cum": CUM_VARIANTS,
        "registers": REGISTER_VARIANTS, "tile_run": TILE_RUN_VARIANTS, "warps128": WARPS_128_VARIANTS,
        "factor_el": FACTOR_EL_VARIANTS, "floor": FLOOR_VARIANTS}
SHAPES = {"scan_group": (1, 131072)}  # (B, T) of a set, where not the anchor shape


def as_tune(env: dict) -> str:
    """A variant's knobs, written as the environment variables of before the tuning table (kept so
    the recorded variants read as they ran), in the one override's form: BLA_TRITON_TUNE's value."""
    items = []
    for name, value in env.items():
        knob = name.removeprefix("BLA_TRITON_").lower()
        if "=" in value:  # per kernel: fwd_out=8,bwd_tokens=8
            items += [f"{knob}.{pair.split('=')[0]}={pair.split('=')[1]}" for pair in value.split(",")]
        else:
            items.append(f"{knob}={value}")
    return ",".join(items)


def run_variant(W, m, env, q, k, v, do):
    saved = os.environ.get(tuning.ENV)
    os.environ[tuning.ENV] = as_tune(env)
    try:
        p = check_problem(q, k, v, W, m, None, None, None, 0, "dirichlet")
        sub, pairs = sub_chunking(p)

        def fwd():
            return bla_attention(q, k, v, W, m, backend="triton", validate_values=False)[0]

        def fwd_bwd():
            fwd().backward(do)

        t_f = do_bench(fwd, warmup=10, rep=50)
        t_fb = do_bench(fwd_bwd, warmup=10, rep=50)
        kernels = kernel_times(fwd_bwd, width=40)
        out = fwd()
        result = [out.detach(), *torch.autograd.grad(out, (q, k, v), do)]  # compared with the default knobs' below
        return dict(W=W, m=m, env=env, sub=sub, pairs=pairs, fwd_ms=t_f, fwd_bwd_ms=t_fb,
                    kernels_ms=sum(kernels.values()), host_ms=host_ms(fwd_bwd),
                    top=dict(sorted(kernels.items(), key=lambda x: -x[1])[:8]), tensors=result)  # fmt: skip
    except Exception as exc:  # a variant that fails to compile or run is reported, not fatal
        return dict(W=W, m=m, env=env, error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        if saved is None:
            os.environ.pop(tuning.ENV, None)
        else:
            os.environ[tuning.ENV] = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--set", choices=sorted(SETS), default="all", help="which list of variants")
    ap.add_argument("--shape", type=int, nargs=2, metavar=("B", "T"), help="batch and length (default: the set's)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args()
    variants = SETS[args.set]
    B, T = args.shape or SHAPES.get(args.set, (4, 8192))
    dtype = getattr(torch, args.dtype)
    print(f"B={B} T={T} H={H} d={d} {args.dtype}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = [torch.randn(B, T, H, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3)]
    do = torch.randn_like(q)
    rows = []
    for W in sorted({w for w, _, _ in variants}):
        flex = _flex_swa_fn(q, k, v, W)
        rows.append(dict(W=W, op="flex", fwd_ms=do_bench(flex, warmup=10, rep=50),
                         fwd_bwd_ms=do_bench(lambda: flex().backward(do), warmup=10, rep=50)))  # fmt: skip
        print("flex", rows[-1], flush=True)
    defaults = {}  # (W, m) -> the output and gradients with no knobs set
    for W, m, env in variants:
        row = run_variant(W, m, env, q, k, v, do)
        tensors = row.pop("tensors", None)
        if tensors is not None and not env:
            defaults[W, m] = tensors
        elif tensors is not None and (W, m) in defaults:  # a knob changes the schedule, not the result: how far apart
            row["max_rel_diff"] = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                                      for a, b in zip(tensors, defaults[W, m]))  # fmt: skip
        rows.append(row)
        print(rows[-1], flush=True)
    print(f"{'W':>5} {'m':>4} {'variant':<44} {'S/pairs':>8} {'fwd':>7} {'fwd+bwd':>8} {'kernels':>8} {'host':>6} {'rel diff':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['W']:>5} {r['m']:>4} {json.dumps(r['env']):<44} ERROR {r['error']}")
            continue
        name = "flex SWA" if r.get("op") == "flex" else json.dumps(r["env"])
        sp = f"{r['sub']}/{r['pairs']}" if "sub" in r else ""
        extra = f" {r['kernels_ms']:8.3f} {r['host_ms']:6.3f}" if "kernels_ms" in r else ""
        extra += f" {r['max_rel_diff']:9.2e}" if "max_rel_diff" in r else ""
        print(f"{r['W']:>5} {r.get('m', ''):>4} {name:<44} {sp:>8} {r['fwd_ms']:7.3f} {r['fwd_bwd_ms']:8.3f}{extra}")
    for r in rows:
        if "top" in r:
            print(r["W"], r["m"], json.dumps(r["env"]), {k: round(v, 3) for k, v in r["top"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), B=B, T=T, dtype=args.dtype, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
