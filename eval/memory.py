"""Long-context memory use: prefill time, per-token decode latency and memory against context
length, for models of one width whose mixers are BLA, SWA or full softmax attention.

Prefill goes through the decode caches in chunks (as a server would), so no T x T mask is ever
built; decode then times single-token steps. Memory is the decode cache's bytes, and on a GPU
also the peak allocated memory.
"""

from __future__ import annotations

import json
import time

import torch

from bla.model import BLALM, apply_overrides, load_preset

DEFAULT_MIXERS = ("bla", "swa", "attn")  # the comparison this benchmark draws by default (any registered kind runs)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(preset: str, mixer: str, contexts: list[int], decode_steps: int, chunk: int, device, dtype) -> list[dict]:
    cfg = apply_overrides(load_preset(preset), [f"layer_pattern=[{mixer}]"])
    torch.manual_seed(0)
    model = BLALM(cfg).to(device=device, dtype=dtype).eval()
    rows = []
    for T in contexts:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, cfg.vocab_size, (1, T + decode_steps), device=device)
        cache = model.new_cache()
        _sync(device)
        t0 = time.perf_counter()
        for s in range(0, T, chunk):
            cache = model(ids[:, s : min(T, s + chunk)], cache=cache).cache
        _sync(device)
        prefill = time.perf_counter() - t0
        cache = model(ids[:, T : T + 1], cache=cache).cache  # warm-up step
        _sync(device)
        t0 = time.perf_counter()
        for i in range(1, decode_steps):
            cache = model(ids[:, T + i : T + i + 1], cache=cache).cache
        _sync(device)
        step = (time.perf_counter() - t0) / max(1, decode_steps - 1)
        row = dict(preset=preset, mixer=mixer, context=T, prefill_s=prefill, decode_ms=1e3 * step,
                   cache_mb=cache.nbytes() / 2**20, dtype=str(dtype).replace("torch.", ""))  # fmt: skip
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
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
    rows = []
    for mixer in args.mixers:
        rows += measure(args.preset, mixer, args.contexts, args.decode_steps, args.chunk, device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    title = f"{args.preset} preset, one sequence, {str(dtype).replace('torch.', '')}, {name}"
    with open(args.json, "w") as f:
        json.dump({"title": title, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    plot(rows, args.png, title)
    print(f"wrote {args.json} and {args.png}")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--preset", default="125m")
    p.add_argument("--mixers", nargs="+", default=list(DEFAULT_MIXERS))
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--json", default="memory.json")
    p.add_argument("--png", default="memory.png")
    p.add_argument("--plot-only", default="", help="draw the PNG from an existing JSON")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bla.eval.memory", description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
