"""Training throughput: tokens/s and MFU of model presets through the trainer's DeepSpeed engine.

``python -m bla.train.benchmark --preset 350m --seq-lens 2048 16384 --mixers bla attn``
Synthetic token ids (the data pipeline is benchmarked on its own: docs/benchmarks.md); bf16 on
GPU; the same number of tokens per step at every context length. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bla.model import BLALM, apply_overrides, flops_per_token, load_preset, param_count

from .config import TrainConfig
from .peak import peak_flops


def measure(preset: str, mixer: str, seq_len: int, tokens_per_step: int, steps: int, zero_stage: int) -> dict:
    import deepspeed

    model_cfg = apply_overrides(load_preset(preset), [f"layer_pattern=[{mixer}]"])
    cfg = TrainConfig(model=model_cfg, zero_stage=zero_stage)
    torch.manual_seed(0)
    model = BLALM(model_cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg.deepspeed(bf16=True))
    B = max(1, tokens_per_step // seq_len)
    ids = torch.randint(0, model_cfg.vocab_size, (B, seq_len + 1), device=engine.device)
    torch.cuda.reset_peak_memory_stats()

    def step():
        loss = engine(ids[:, :-1], labels=ids[:, 1:], loss_chunk=cfg.loss_chunk).loss  # the trainer's own step
        engine.backward(loss)
        engine.step()

    t_first = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t_first
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tps = B * seq_len / dt
    name = torch.cuda.get_device_name()
    peak, _ = peak_flops(engine.device, torch.bfloat16)
    return dict(preset=preset, mixer=mixer, params=param_count(model_cfg), seq_len=seq_len, batch=B,
                step_s=dt, tokens_per_s=tps, mfu=flops_per_token(model_cfg, seq_len) * tps / peak,
                peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9, first_step_s=first, device=name)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bla.train.benchmark", description=__doc__)
    p.add_argument("--presets", nargs="+", default=["125m", "350m"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--mixers", nargs="+", default=["bla", "attn"])
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--json", default="bench_train.json")
    args = p.parse_args(argv)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    rows = []
    for preset in args.presets:
        for T in args.seq_lens:
            for mixer in args.mixers:
                r = measure(preset, mixer, T, args.tokens_per_step, args.steps, args.zero_stage)
                rows.append(r)
                print(f"{preset:>5} {mixer:>5} T={T:>6} B={r['batch']:>2} {r['tokens_per_s']:>10,.0f} tok/s "
                      f"MFU {100 * r['mfu']:5.1f}%  mem {r['peak_mem_gb']:5.1f} GB  first step {r['first_step_s']:.1f}s", flush=True)  # fmt: skip
                torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
