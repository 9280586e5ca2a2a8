"""GPU benchmarks and large-shape accuracy of the Triton backend (``python benchmarks/kernel.py gpu|accuracy``).

``gpu``: forward and forward+backward times (``triton.testing.do_bench``) of BLA against
causal SDPA (flash), sliding-window attention at the same W (``flex_attention``) and fla's
``chunk_gsa`` when installed, with flex's time over BLA's for every row and BLA's kernel time
per forward+backward (what the GPU spends, where do_bench may include host waits); T swept at a
fixed token count per batch; first-call times at a new shape with an empty Triton cache.
``accuracy``: the Triton backend in bf16 against the torch backend in fp32 (outputs, final
states, gradients) at B=4, T=8192, H=16.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

import torch

from bla.kernels import GATES, bla_attention, dirichlet_gates


def _inputs(B, T, H, d, dtype, grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, T, H, d, device="cuda", dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)]


def _bench(fn, grad_of=None):
    from triton.testing import do_bench

    fwd = do_bench(lambda: fn(), warmup=10, rep=50)
    if grad_of is None:
        return fwd, float("nan")

    def fwd_bwd():
        out = fn()
        out.backward(grad_of)

    return fwd, do_bench(fwd_bwd, warmup=10, rep=50)


def _kernel_ms(fn, grad_of, calls: int = 5) -> float:
    """The GPU's time (ms) of one forward+backward of fn: the CUDA time of the kernels it launches
    (torch profiler), mean of ``calls``, the leaves' ``.grad`` accumulation included as in do_bench's.
    Beside do_bench's time, which also holds any wait on the host."""
    from torch.profiler import ProfilerActivity, profile

    fn().backward(grad_of)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn().backward(grad_of)
        torch.cuda.synchronize()
    return sum(e.device_time for e in prof.events() if e.device_type.name == "CUDA") / 1000 / calls


def add_ratios(row: dict, flex: dict | None) -> dict:
    """flex SWA's time over BLA's (above 1: BLA is faster) for the forward and forward+backward,
    from the flex timings at the same (W, d, T) (``flex``: flex_swa_fwd_ms, flex_swa_fwdbwd_ms)."""
    if flex is None:
        return row
    for part in ("fwd", "fwdbwd"):
        bla, other = row.get(f"bla_{part}_ms"), flex.get(f"flex_swa_{part}_ms")
        if bla and other:
            row[f"flex_over_bla_{part}"] = other / bla
    return row


def table(rows: list[dict]) -> str:
    """The benchmark's rows as a table: BLA's do_bench and kernel times, flex SWA's, their ratios."""
    head = f"{'W':>5} {'m':>4} {'d':>4} {'B':>3} {'T':>7} | {'BLA fwd':>8} {'fwd+bwd':>8} {'kernels':>8} | " \
           f"{'flex fwd':>8} {'fwd+bwd':>8} | {'flex/BLA fwd':>12} {'fwd+bwd':>8}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if "bla_fwd_ms" not in r:
            continue
        cell = lambda key, width, fmt=".3f": f"{r[key]:>{width}{fmt}}" if key in r else " " * (width - 1) + "-"  # noqa: E731
        lines.append(f"{r['W']:>5} {r['m']:>4} {r['d']:>4} {r['B']:>3} {r['T']:>7} | {cell('bla_fwd_ms', 8)} "
                     f"{cell('bla_fwdbwd_ms', 8)} {cell('bla_fwdbwd_kernels_ms', 8)} | {cell('flex_swa_fwd_ms', 8)} "
                     f"{cell('flex_swa_fwdbwd_ms', 8)} | {cell('flex_over_bla_fwd', 12, '.2f')} {cell('flex_over_bla_fwdbwd', 8, '.2f')}")  # fmt: skip
    return "\n".join(lines)


def _bla_fn(q, k, v, W, m, gates):
    return lambda: bla_attention(q, k, v, W, m, backend="triton", gates=gates)[0]


def _sdpa_fn(q, k, v):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)


def _flex_swa_fn(q, k, v, W):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T, H, _ = q.shape
    # compiled, the block mask is built tile by tile: eagerly it materialises a T x T boolean
    # (128 GiB at T = 131,072)
    block_mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < W), None, None, T, T, device="cuda", _compile=True)
    flex = torch.compile(flex_attention)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: flex(qt, kt, vt, block_mask=block_mask).transpose(1, 2)


def _fla_gsa_fn(q, k, v, W, m, gates):
    """fla's chunk_gsa fed BLA's own writes and log-decays (floored at resets): the same operator."""
    from fla.ops.gsa import chunk_gsa

    B, T, H, d = q.shape
    s, alpha, _ = dirichlet_gates(torch.arange(T, device="cuda"), torch.tensor([W] * H, device="cuda"), m, gates=gates)
    s = s.to(q.dtype)[None].expand(B, T, H, m).contiguous()
    g = torch.log(alpha.clamp_min(1e-13)).float()[None].expand(B, T, H, m).contiguous()
    return lambda: chunk_gsa(q, k, v, s, g)[0]


def bla_flops(B, T, H, d, m, fwd_bwd: bool) -> float:
    """Model FLOPs by spec section 3 (4 H m (d_k + d_v) per token forward; x3 for fwd+bwd)."""
    f = 4 * H * m * (2 * d) * B * T
    return 3 * f if fwd_bwd else f


def first_call_seconds(B, T, H, d, m, W) -> dict:
    """Compile time at a new shape in a fresh process with an empty Triton cache."""
    code = (
        "import time, torch; from bla.kernels import bla_attention\n"
        f"q,k,v=[torch.randn({B},{T},{H},{d},device='cuda',dtype=torch.bfloat16,requires_grad=True) for _ in range(3)]\n"
        "torch.cuda.synchronize(); t=time.perf_counter()\n"
        f"o,_=bla_attention(q,k,v,{W},{m},backend='triton'); torch.cuda.synchronize(); f=time.perf_counter()-t\n"
        "t=time.perf_counter(); o.sum().backward(); torch.cuda.synchronize(); b=time.perf_counter()-t\n"
        "print(f, b)\n"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    f, b = map(float, out.stdout.split()[-2:])
    return {"first_fwd_s": f, "first_bwd_s": b}


def gpu_benchmark(args) -> list[dict]:
    """Operator timings: BLA (Triton) against SDPA flash, flex_attention SWA and fla GSA."""
    rows, flex_at = [], {}  # flex SWA's timings per (W, d, T), for the ratios of every m
    have_fla = importlib.util.find_spec("fla") is not None
    dtype = torch.bfloat16
    H = args.heads
    for W, d, m in ((W, d, m) for W in args.window for d in args.head_dims for m in args.slots):
        for T in args.seq_lens:
            B = max(1, args.tokens // T)
            q, k, v = _inputs(B, T, H, d, dtype, grad=True)
            do = torch.randn(B, T, H, d, device="cuda", dtype=dtype)
            row = dict(B=B, T=T, H=H, d=d, m=m, W=W, gates=args.gates)
            bla = _bla_fn(q, k, v, W, m, args.gates)
            row["bla_fwd_ms"], row["bla_fwdbwd_ms"] = _bench(bla, do)
            row["bla_fwdbwd_kernels_ms"] = _kernel_ms(bla, do)
            if m == args.slots[0]:  # the softmax baselines do not depend on m
                row["sdpa_fwd_ms"], row["sdpa_fwdbwd_ms"] = _bench(_sdpa_fn(q, k, v), do)
                if not args.no_flex:
                    row["flex_swa_fwd_ms"], row["flex_swa_fwdbwd_ms"] = _bench(_flex_swa_fn(q, k, v, W), do)
                    flex_at[W, d, T] = row
            add_ratios(row, flex_at.get((W, d, T)))
            if have_fla:
                if not rows:  # fla autotunes 19 kernels at its first call (343 s on an H200): say why nothing prints
                    print(f"{_fmt(row)}; timing fla's chunk_gsa (its first call autotunes, for minutes)", flush=True)
                row["fla_gsa_fwd_ms"], row["fla_gsa_fwdbwd_ms"] = _bench(_fla_gsa_fn(q, k, v, W, m, args.gates), do)
            io_bytes = 4 * B * T * H * d * 2  # q, k, v, o in bf16
            row["bla_fwd_tflops"] = bla_flops(B, T, H, d, m, False) / row["bla_fwd_ms"] / 1e9
            row["bla_fwd_gbps"] = io_bytes / row["bla_fwd_ms"] / 1e6
            rows.append(row)
            print(_fmt(row), flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()
    if args.first_call:
        W, m = args.window[0], args.slots[0]  # at the first window and slot count asked for
        fc = dict(B=4, T=8192, H=H, d=64, m=m, W=W, **first_call_seconds(4, 8192, H, 64, m, W))
        print(f"first call at a new shape (empty Triton cache): forward {fc['first_fwd_s']:.2f} s, "
              f"backward {fc['first_bwd_s']:.2f} s")  # fmt: skip
        rows.append(fc)
    print(table(rows), flush=True)
    return rows


def _fmt(r: dict) -> str:
    keys = ["B", "T", "H", "d", "m", "W", "bla_fwd_ms", "bla_fwdbwd_ms", "bla_fwdbwd_kernels_ms", "sdpa_fwd_ms",
            "sdpa_fwdbwd_ms", "flex_swa_fwd_ms", "flex_swa_fwdbwd_ms", "flex_over_bla_fwd", "flex_over_bla_fwdbwd",
            "fla_gsa_fwd_ms", "fla_gsa_fwdbwd_ms", "bla_fwd_tflops", "bla_fwd_gbps"]  # fmt: skip
    return " ".join(f"{k}={r[k]:.3f}" if isinstance(r.get(k), float) else f"{k}={r[k]}" for k in keys if k in r)


def accuracy(args) -> list[dict]:
    """bf16 Triton against fp32 torch: relative errors of o, final state and gradients."""
    rows = []
    B, T, H = 4, args.acc_seq_len, 16
    for W, d, m, gates in ((W, d, m, g) for W in args.window for d in args.head_dims for m in args.slots for g in args.all_gates):
        q, k, v = _inputs(B, T, H, d, torch.bfloat16, grad=True, seed=1)
        do = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
        o, (K, V) = bla_attention(q, k, v, W, m, output_final_state=True, backend="triton", gates=gates)
        grads = torch.autograd.grad(o, (q, k, v), do)
        ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
        o_r, (K_r, V_r) = bla_attention(*ref_in, W, m, output_final_state=True, backend="torch", gates=gates)
        ref_grads = torch.autograd.grad(o_r, ref_in, do.float())
        rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
        row = dict(B=B, T=T, H=H, d=d, m=m, W=W, gates=gates, o=rel(o, o_r), K=rel(K, K_r), V=rel(V, V_r),
                   dq=rel(grads[0], ref_grads[0]), dk=rel(grads[1], ref_grads[1]), dv=rel(grads[2], ref_grads[2]),
                   nan=bool(any(torch.isnan(x).any() for x in (o, K, V, *grads))))  # fmt: skip
        print(" ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
        del q, k, v, do, o, grads, ref_in, o_r, ref_grads
        torch.cuda.empty_cache()
    return rows


def add_gpu_parser(sub) -> None:
    for mode, fn in (("gpu", gpu_benchmark), ("accuracy", accuracy)):
        p = sub.add_parser(mode, help=(fn.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--heads", type=int, default=16)
        p.add_argument("--window", type=int, nargs="+", default=[512])
        p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
        p.add_argument("--slots", type=int, nargs="+", default=[32, 64, 128, 256])
        p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536, 131072])
        p.add_argument("--tokens", type=int, default=32768 * 4, help="tokens per batch (B = tokens // T)")
        p.add_argument("--acc-seq-len", type=int, default=8192)
        p.add_argument("--first-call", action="store_true")
        p.add_argument("--no-flex", action="store_true")
        p.add_argument("--gates", default="dirichlet", choices=GATES, help="BLA's gates (gpu mode)")
        p.add_argument("--all-gates", nargs="+", default=list(GATES), choices=GATES, help="gates compared (accuracy mode)")
        p.add_argument("--json", default=f"bench_{mode}.json")
        p.set_defaults(run=fn)

