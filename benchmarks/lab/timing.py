"""Timers shared by the benchmark scripts in this folder (run them from the repo root:
``python benchmarks/lab/<script>.py``; this folder is then first on the import path)."""

import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_times(fn, calls=5, width=48):
    """CUDA time (ms) of each kernel fn launches, mean over ``calls`` calls (torch profiler)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            times[e.name[:width]] += e.device_time / 1000 / calls
    return times


def host_ms(fn, calls=20):
    """The host's time (ms) to issue fn, from an idle GPU queue (a sync before each call, none after)."""
    fn()
    total = 0.0
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    torch.cuda.synchronize()
    return total / calls * 1e3
