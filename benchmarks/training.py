"""Training throughput: tokens/s and MFU of model presets through the trainer's DeepSpeed engine,
beside a plain compiled PyTorch transformer of the same shape measured in the same run.

``python benchmarks/training.py --presets 350m --seq-lens 2048 16384 --mixers bla attn --baseline``
Synthetic token ids (the data pipeline is benchmarked on its own: benchmarks/reports/2026-11-to-12.md); bf16 on
GPU; the same number of tokens per step at every context length. The engine is built as the
trainer builds it (compile, activation checkpointing, fused AdamW, chunked loss) and each step
is the trainer's: forward, the finiteness check of nan_policy, backward, step; the loss is read
only at the end. ``--profile`` prints the top kernels of one step per row, after the sum of all
kernels' time and its share of the step's wall time (the GPU's busy share). Prints a table and
the ratios against the baseline; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bla.model import BLALM, apply_overrides, flops_per_token, load_preset, param_count
from bla.model.config import set_dotted, split_override

from bla.train.config import TrainConfig
from bla.train.peak import peak_flops


WARMUP_STEPS = 5  # with 2 and one window of 8 steps, rows of one step scattered by 7% in a process (H100, 2026-12-07)
WINDOWS = 3  # timed windows of --steps steps each: the row reports their median, and their spread


def _timed(step, steps: int) -> tuple[float, float, list[float]]:
    """(first call's seconds, compilation included; median seconds per step over WINDOWS windows of
    ``steps`` steps after WARMUP_STEPS warm-ups; each window's seconds per step)."""
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(WARMUP_STEPS):
        step()
    windows = []
    for _ in range(WINDOWS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        windows.append((time.perf_counter() - t0) / steps)
    return first, sorted(windows)[len(windows) // 2], windows


def _profile(step, top: int = 15) -> list[dict]:
    """The top kernels of one step by GPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    # the GPU's busy share of the step: the rest is the host (Python, launches, waits)
    head = {"kernel": "(all kernels)", "ms": total / 1e3, "share": total / 1e6 / wall, "calls": sum(e.count for e in events)}
    return [head] + [{"kernel": e.key[:90], "ms": e.self_device_time_total / 1e3, "share": e.self_device_time_total / total,
                      "calls": e.count} for e in events[:top]]  # fmt: skip


def _row(name: str, cfg_model, seq_len: int, batch: int, timing: tuple, peak: float, **extra) -> dict:
    first, dt, windows = timing
    tps = batch * seq_len / dt
    return dict(name=name, params=param_count(cfg_model), seq_len=seq_len, batch=batch, step_s=dt, tokens_per_s=tps,
                tokens_per_s_windows=[batch * seq_len / w for w in windows],
                mfu=flops_per_token(cfg_model, seq_len) * tps / peak, peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9,
                first_step_s=first, device=torch.cuda.get_device_name(), **extra)  # fmt: skip


# Ways to run the bla-lm rows' step, for A/B comparisons in one run (``--variants``)
VARIANTS = {
    "default": "the trainer's step",
    "eager_loss": "the chunked loss eager, as before issue 43 (the blocks compiled)",
    "no_check": "without nan_policy's finiteness check (no host read per micro-batch)",
    "check_first": "nan_policy's check read before the backward is queued (the trainer before 2026-12-07)",
    "cuda_graphs": "the blocks compiled with mode=reduce-overhead (Inductor's CUDA graph trees)",
    "whole_model": "the whole model compiled as one region (one guard check and AOT wrapper a step, not one a block)",
    "cuda_graphs_no_check": "cuda_graphs without nan_policy's check: what the host read still costs under graphs",
    "ds_grads": "DeepSpeed's own gradient hand-over (a cast and an add a parameter), not the trainer's foreach add",
    "cuda_graphs_ds_grads": "cuda_graphs with DeepSpeed's own gradient hand-over",
    "split_proj": "the input projections one matmul a module, as before the compiled path stacked them (one matmul)",
    "cuda_graphs_split_proj": "cuda_graphs with the input projections one matmul a module",
}


def packed_batch(vocab: int, rows: int, seq_len: int, mean_doc: int, seed: int = 0) -> dict:
    """``rows`` rows of random documents (lengths exponential around ``mean_doc``, cut at the row's
    end) packed into one row with ``cu_seqlens`` (padded to a power of two) and per-document
    positions, as the trainer's LM batches are; no label crosses into the next document."""
    from bla.data.packing import pad_cu_seqlens

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len + 1), generator=g)
    labels = ids[:, 1:].clone()
    cu, positions = [0], torch.zeros(rows, seq_len, dtype=torch.long)
    for r in range(rows):
        t = 0
        while t < seq_len:
            n = min(seq_len - t, max(2, int(torch.empty(1).exponential_(1 / mean_doc, generator=g))))
            positions[r, t : t + n] = torch.arange(n)
            labels[r, t + n - 1] = -100 if t + n < seq_len else labels[r, t + n - 1]  # the next token is another document's
            t += n
            cu.append(r * seq_len + t)
    return {"input_ids": ids[:, :-1].reshape(1, -1), "labels": labels.reshape(1, -1), "positions": positions.reshape(1, -1),
            "cu_seqlens": pad_cu_seqlens(torch.tensor(cu, dtype=torch.int32))}  # fmt: skip


def _loss_now(engine, batch: dict, loss_chunk: int, variant: str) -> float:
    """The batch's loss without an update. Before training, variants that compute the same agree to
    rounding; after the same updates on the same batch, bf16's rounding has had steps to grow."""
    from bla.train.trainer import forward_loss

    with torch.no_grad():
        if variant.startswith("cuda_graphs"):
            torch.compiler.cudagraph_mark_step_begin()
        return float(forward_loss(engine, batch, engine.device, None, loss_chunk)[0])


def measure(preset: str, mixer: str, seq_len: int, tokens_per_step: int, steps: int, overrides: list[str], profile: bool,
            variant: str = "default", packed: int = 0) -> dict:  # fmt: skip
    import deepspeed

    from bla.model import mixers
    from bla.train.bf16_grads import fuse_hp_grad_update
    from bla.train.trainer import aligned_param_groups, finite_later, forward_loss

    model_cfg = apply_overrides(load_preset(preset), [f"layer_pattern=[{mixer}]"])
    settings = {**TrainConfig().to_dict(), "model": model_cfg.to_dict()}
    for item in overrides:  # trainer settings: compile=false, activation_checkpointing=ops, zero_stage=1, ...
        set_dotted(settings, *split_override(item))
    cfg = TrainConfig.from_dict(settings, validate=False)
    model_cfg = cfg.model  # with the --set model.* overrides (model.bla.output_gate=false, ...)
    mixers.FUSE_PROJECTIONS = not variant.endswith("split_proj")  # read when the blocks are traced
    torch.manual_seed(0)
    model = BLALM(model_cfg)
    model.set_checkpointing(cfg.activation_checkpointing)
    if cfg.compiles("cuda") and variant == "whole_model":
        model.compile()
        model.head.loss_compile = {}  # its chunks compiled as compile_blocks does
    elif cfg.compiles("cuda"):
        model.compile_blocks(**({"mode": "reduce-overhead"} if variant.startswith("cuda_graphs") else {}))
        if variant == "eager_loss":
            model.head.loss_compile = None
    engine, *_ = deepspeed.initialize(model=model, model_parameters=aligned_param_groups(model.parameters()),
                                     config=cfg.deepspeed(bf16=True))
    if not variant.endswith("ds_grads"):
        fuse_hp_grad_update(engine.optimizer)  # as the trainer does
    B = max(1, tokens_per_step // seq_len)
    if packed:
        batch = packed_batch(model_cfg.vocab_size, B, seq_len, packed)
    else:
        ids = torch.randint(0, model_cfg.vocab_size, (B, seq_len + 1))
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    torch.cuda.reset_peak_memory_stats()
    loss_before = _loss_now(engine, batch, cfg.loss_chunk, variant)

    def step():  # the trainer's micro-batch (bla.train.trainer._Run.micro_batches)
        if variant.startswith("cuda_graphs"):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten now
        loss, _ = forward_loss(engine, batch, engine.device, None, cfg.loss_chunk)
        if variant == "check_first":
            bool(torch.isfinite(loss.detach()).all())
        finite = None if variant.endswith(("no_check", "check_first")) else finite_later(loss)
        engine.backward(loss)
        if finite is not None:
            finite()  # nan_policy's check: the step's one read of the device, behind the queued backward
        engine.step()

    timing = _timed(step, steps)
    loss_after = _loss_now(engine, batch, cfg.loss_chunk, variant)
    peak, _ = peak_flops(engine.device, torch.bfloat16)
    name = f"bla-lm {preset} {mixer}" + ("" if variant == "default" else f" {variant}") + (" packed" if packed else "")
    row = _row(name, model_cfg, seq_len, B, timing, peak, preset=preset, mixer=mixer,
               compiled=cfg.compiles("cuda"), activation_checkpointing=cfg.activation_checkpointing, variant=variant,
               packed_mean_doc=packed, documents=int((batch.get("cu_seqlens", torch.zeros(2)).diff() > 0).sum()),
               loss_before=loss_before, loss_after=loss_after)  # fmt: skip
    if profile:
        row["profile"] = _profile(step)
    return row


def measure_baseline(preset: str, seq_len: int, tokens_per_step: int, steps: int, profile: bool) -> dict:
    from baseline import PlainTransformer, make_step  # beside this script

    cfg = apply_overrides(load_preset(preset), ["layer_pattern=[attn]"])
    torch.manual_seed(0)
    model = PlainTransformer(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.mlp_hidden, cfg.rope_theta).cuda()
    train_step = make_step(model)
    B = max(1, tokens_per_step // seq_len)
    ids = torch.randint(0, cfg.vocab_size, (B, seq_len + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        return train_step(ids[:, :-1], ids[:, 1:])

    timing = _timed(step, steps)
    peak, _ = peak_flops(torch.device("cuda"), torch.bfloat16)
    # MFU by the attn model's FLOPs: the same shape (the baseline has no output gate or norm extras)
    row = _row(f"plain PyTorch {preset}-shaped", cfg, seq_len, B, timing, peak, preset=preset, mixer="baseline")
    if profile:
        row["profile"] = _profile(step)
    return row


def measure_plain_loop(preset: str, mixer: str, seq_len: int, tokens_per_step: int, steps: int, loss_chunk: int) -> dict:
    """bla-lm's model (compiled blocks, chunked loss) in the baseline's loop (fp32 weights, bf16
    autocast, fused AdamW, no DeepSpeed): with the baseline and the DeepSpeed row, it tells the
    model's cost from the engine's."""
    model_cfg = apply_overrides(load_preset(preset), [f"layer_pattern=[{mixer}]"])
    torch.manual_seed(0)
    from baseline import make_step

    model = BLALM(model_cfg).cuda()
    model.compile_blocks()
    train_step = make_step(model, forward=lambda ids, labels: model(ids, targets=labels, loss_chunk=loss_chunk).loss)
    B = max(1, tokens_per_step // seq_len)
    ids = torch.randint(0, model_cfg.vocab_size, (B, seq_len + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        train_step(ids[:, :-1], ids[:, 1:])

    timing = _timed(step, steps)
    peak, _ = peak_flops(torch.device("cuda"), torch.bfloat16)
    return _row(f"bla-lm {preset} {mixer}, plain loop", model_cfg, seq_len, B, timing, peak, preset=preset, mixer=mixer)


def _print(r: dict, base: dict | None) -> None:
    ratio = f"  {r['tokens_per_s'] / base['tokens_per_s']:.2f}x baseline" if base and base is not r else ""
    ratio += f"  loss {r['loss_before']:.6f} -> {r['loss_after']:.6f}" if "loss_after" in r else ""
    spread = f" ({min(r['tokens_per_s_windows']):,.0f}-{max(r['tokens_per_s_windows']):,.0f})"
    print(f"{r['name']:>28} T={r['seq_len']:>6} B={r['batch']:>2} {r['tokens_per_s']:>10,.0f}{spread} tok/s MFU {100 * r['mfu']:5.1f}% "
          f"mem {r['peak_mem_gb']:5.1f} GB  first step {r['first_step_s']:.1f}s{ratio}", flush=True)  # fmt: skip
    for k in r.get("profile", []):
        print(f"{'':>30}{k['ms']:8.2f} ms {100 * k['share']:5.1f}% x{k['calls']:<4} {k['kernel']}")


def _measure_all(args) -> list[dict]:
    """Every (preset, T, mixer) row the arguments ask for, printed as measured."""
    rows = []
    for preset in args.presets:
        for T in args.seq_lens:
            base = measure_baseline(preset, T, args.tokens_per_step, args.steps, args.profile) if args.baseline else None
            if base:
                rows.append(base)
                _print(base, None)
                torch.cuda.empty_cache()
            for mixer in args.mixers:
                for variant in args.variants:
                    # each row builds a new model whose blocks share their forward's code object: without a reset the
                    # compile caches of earlier rows count against dynamo's recompile limit (8), and a fourth row
                    # in one process fell back to eager (125m attn, one H100, 2026-12-07: 0.47x of its own earlier row)
                    torch._dynamo.reset()
                    try:
                        r = measure(preset, mixer, T, args.tokens_per_step, args.steps, args.set, args.profile, variant,
                                    args.packed)  # fmt: skip
                    except Exception as e:  # a variant that cannot run here (CUDA graphs) says why; the rest go on
                        rows.append({"name": f"bla-lm {preset} {mixer} {variant}", "seq_len": T, "error": f"{type(e).__name__}: {e}"[:2000]})
                        print(f"bla-lm {preset} {mixer} {variant} T={T}: failed: {rows[-1]['error']}", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    if base:
                        r["vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
                    rows.append(r)
                    _print(r, base)
                    torch.cuda.empty_cache()
                if args.plain_loop:
                    rows.append(measure_plain_loop(preset, mixer, T, args.tokens_per_step, args.steps, TrainConfig().loss_chunk))
                    _print(rows[-1], base)
                    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/training.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--presets", nargs="+", default=["125m", "350m"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--mixers", nargs="+", default=["bla", "attn"])
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--baseline", action="store_true", help="also the plain compiled transformer of each preset's shape")
    p.add_argument("--profile", action="store_true", help="print each row's top kernels of one step")
    p.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS),
                   help="ways to run the bla-lm rows' step, each its own row: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    p.add_argument("--packed", type=int, default=0, metavar="MEAN_DOC",
                   help="bla-lm rows on packed documents of this mean length (cu_seqlens, as LM training packs), not dense rows")
    p.add_argument("--plain-loop", action="store_true", help="also each mixer's model in the baseline's loop (no DeepSpeed)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="settings for the bla-lm rows, the trainer's and the model's (compile=false, zero_stage=1, model.bla.output_gate=false)")
    p.add_argument("--json", default="bench_train.json")
    args = p.parse_args(argv)
    from bla.train.trainer import init_distributed, shutdown_distributed

    init_distributed()  # one process: a world of one
    try:
        rows = _measure_all(args)
    finally:
        shutdown_distributed()
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "settings": args.set, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
