"""The device's peak FLOP/s, the denominator of MFU: a datasheet figure where the device is known,
otherwise measured once (a dense matrix product in the training dtype) and cached per device.

A measured peak is what the device reaches on dense matrix products (the best of PEAK_SIZES), not
its datasheet number: MFU against it reads "share of what this device's matrix unit does", which is
the honest figure on a GPU the table does not know, and the only one on a CPU.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

# dense bf16 tensor-core FLOP/s, SXM parts (NVIDIA datasheets); the first name found in the device's wins
DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in sorted(DATASHEET_PEAK.items(), key=lambda kv: -len(kv[0])) if k in name), None)


# Matrix sizes a measured peak is the best of. A CPU's best size depends on its caches and the dtype:
# one thread of a 2-core x86 machine (2026-12-04) did bf16 products at 2.9 GFLOP/s at n = 128, 1.3
# at 512 and 0.9 at 1024 (fp32: 46, 94 and 92), so n = 1024 alone read as a "peak" that training
# beat (MFU 1.05 in CI); past 512 no size did better, and bf16's 1024 took 14 s to measure.
PEAK_SIZES = {"cuda": (8192,), "cpu": (128, 256, 512)}


def measure_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` n x n matrix products in ``dtype``, over the device's
    PEAK_SIZES (or n alone); seconds on a CPU, less on a GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for size in (n,) if n else PEAK_SIZES.get(device.type, PEAK_SIZES["cpu"]):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up: kernel selection and allocation
        sync()
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype, cache_dir: str | os.PathLike | None = None) -> tuple[float, str]:
    """``(FLOP/s, where it came from)``: the datasheet for a known GPU, else a measurement, cached in
    ``cache_dir/peak_flops.json`` by device and dtype so a run measures at most once."""
    name = device_name(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and (known := datasheet_peak(name)):
        return known, f"datasheet ({name})"
    key = f"{name}|{dtype}"
    path = Path(os.path.expanduser(cache_dir)) / "peak_flops.json" if cache_dir else None
    cached = {}
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except ValueError:
            cached = {}  # a damaged cache is measured again and rewritten
        cached = cached if isinstance(cached, dict) else {}
    if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
        return float(cached[key]), f"measured earlier ({path})"
    value = measure_peak(device, dtype)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**cached, key: value}, indent=1))
        os.replace(tmp, path)
    return value, "measured"
