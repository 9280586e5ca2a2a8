"""Inference against context: prefill time, per-token decode latency, decode throughput at
several batch sizes, and memory, for models of one width whose mixers are BLA, SWA or full
softmax attention, in one run.

Decoding runs through ``bla.model.decode.StaticDecoder`` for every mixer alike: preallocated
per-layer buffers (attention's keys and values up to the context + the decoded tokens), one
step captured as a CUDA graph on a GPU (the same code eagerly on a CPU). Prefill is one call per
layer over the prompt (``--chunk`` > 0: that many tokens at a time through the cache). Memory is
the decode state's bytes and, on a GPU, the peak allocated memory.
"""

from __future__ import annotations

import json
import time

import torch

from bla.model import BLALM, apply_overrides, load_preset
from bla.model.decode import StaticDecoder

DEFAULT_MIXERS = ("bla", "attn")  # the comparison this benchmark draws by default (bla, attn, swa run)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(preset: str, mixer: str, device, dtype) -> BLALM:
    cfg = apply_overrides(load_preset(preset), [f"layer_pattern=[{mixer}]"])
    torch.manual_seed(0)
    return BLALM(cfg).to(device=device, dtype=dtype).eval()


def _decode_time(dec: StaticDecoder, first: torch.Tensor, steps: int) -> float:
    """Seconds per step, after one untimed step (the capture on a GPU)."""
    nxt = first.argmax(-1)
    nxt = dec.step(nxt).argmax(-1)
    _sync(dec.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = dec.step(nxt).argmax(-1)
    _sync(dec.device)
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def measure(preset: str, mixer: str, contexts: list[int], decode_steps: int, chunk: int, device, dtype) -> list[dict]:
    """One sequence at each context: prefill seconds, decode ms per token, state and peak memory."""
    model = _model(preset, mixer, device, dtype)
    rows = []
    for T in contexts:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, model.cfg.vocab_size, (1, T), device=device)
        dec = StaticDecoder(model, 1, T + decode_steps + 1)
        times = []
        for _ in range(2):  # the first call at a new length compiles kernels for it (Triton specialises)
            _sync(device)
            t0 = time.perf_counter()
            logits = dec.prefill(ids, chunk)
            _sync(device)
            times.append(time.perf_counter() - t0)
        step = _decode_time(dec, logits, decode_steps)
        row = dict(preset=preset, mixer=mixer, context=T, batch=1, prefill_s=times[1], first_prefill_s=times[0], decode_ms=1e3 * step,
                   cache_mb=dec.nbytes() / 2**20, graph=dec.graph is not None, dtype=str(dtype).replace("torch.", ""))  # fmt: skip
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        del dec
    return rows


@torch.no_grad()
def throughput(preset: str, mixer: str, context: int, batches: list[int], decode_steps: int, device, dtype) -> list[dict]:
    """Generated tokens per second for ``batch`` sequences decoded together after a ``context``-token prompt."""
    model = _model(preset, mixer, device, dtype)
    rows = []
    for B in batches:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dec = StaticDecoder(model, B, context + decode_steps + 1)
        logits = dec.prefill(torch.randint(0, model.cfg.vocab_size, (B, context), device=device))
        step = _decode_time(dec, logits, decode_steps)
        row = dict(preset=preset, mixer=mixer, context=context, batch=B, decode_ms=1e3 * step, tokens_per_s=B / step,
                   graph=dec.graph is not None)  # fmt: skip
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        del dec
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if "peak_gb" in rows[0] else 2, figsize=(15 if "peak_gb" in rows[0] else 10, 4))
    panels = [("decode_ms", "decode latency per token (ms)"), ("cache_mb", "decode cache (MiB)")]
    if "peak_gb" in rows[0]:
        panels.append(("peak_gb", "peak GPU memory (GB)"))
    for ax, (key, label) in zip(axes, panels):
        for mixer in dict.fromkeys(r["mixer"] for r in rows):
            pts = [(r["context"], r[key]) for r in rows if r["mixer"] == mixer]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mixer)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args) -> int:
    if args.plot_only:
        data = json.loads(open(args.plot_only).read())
        plot(data["rows"], args.png, data.get("title", "long-context memory"))
        print(f"wrote {args.png}")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, batched = [], []
    for mixer in args.mixers:
        rows += measure(args.preset, mixer, args.contexts, args.decode_steps, args.chunk, device, dtype)
        if args.batches:
            batched += throughput(args.preset, mixer, args.batch_context, args.batches, args.decode_steps, device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    title = f"{args.preset} preset, one sequence, {str(dtype).replace('torch.', '')}, {name}"
    with open(args.json, "w") as f:
        json.dump({"title": title, "date": time.strftime("%Y-%m-%d"), "rows": rows, "throughput": batched}, f, indent=1)
    plot(rows, args.png, title)
    print(f"wrote {args.json} and {args.png}")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--preset", default="125m")
    p.add_argument("--mixers", nargs="+", default=list(DEFAULT_MIXERS))
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--chunk", type=int, default=0, help="prefill this many tokens at a time (0: the whole prompt in one call)")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64], help="decode throughput at these batch sizes")
    p.add_argument("--batch-context", type=int, default=1024, help="prompt length of the throughput rows")
    p.add_argument("--json", default="memory.json")
    p.add_argument("--png", default="memory.png")
    p.add_argument("--plot-only", default="", help="draw the PNG from an existing JSON")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bla.eval.memory", description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
