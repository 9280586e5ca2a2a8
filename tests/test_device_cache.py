"""Device tensors cached across calls (bla.kernels.device_cache): built once, and on a GPU built
outside the memory pool of CUDA graph trees even when first asked for inside a compiled region's
warm-up (where the trainer's cuda_graphs=true failed with plain lru_cache tables)."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

from bla.kernels.device_cache import device_cache


def test_a_cached_build_runs_once_per_key_and_returns_the_same_tensor():
    calls = []

    @device_cache(maxsize=4)
    def table(n: int, device: str) -> torch.Tensor:
        calls.append(n)
        return torch.arange(n, device=device)

    a, b, c = table(3, "cpu"), table(3, "cpu"), table(5, "cpu")
    assert a is b and calls == [3, 5] and c.tolist() == [0, 1, 2, 3, 4]
    assert table.cache_info().hits == 1 and table.__name__ == "table"
    table.cache_clear()
    table(3, "cpu")
    assert calls == [3, 5, 3]


# CUDA's stream calls faked on the CPU, so that builds take the GPU's route through the builder thread
_NESTED_BUILDS = """
import contextlib, threading, types
import torch
from bla.kernels.device_cache import device_cache

class Stream:
    device = types.SimpleNamespace(index=0)
    def __init__(self, device=None): pass
    def wait_stream(self, other): pass

cuda = torch.cuda
cuda.is_initialized, cuda.is_current_stream_capturing = (lambda: True), (lambda: False)
cuda.current_stream = cuda.default_stream = cuda.Stream = Stream
cuda.stream = cuda.device = lambda _: contextlib.nullcontext()
threads = []

@device_cache(maxsize=4)
def windows(n):
    threads.append(threading.current_thread().name)
    return torch.arange(n)

@device_cache(maxsize=4)
def layout(n):  # a build that needs another cached tensor, as the kernels' layouts need their windows
    threads.append(threading.current_thread().name)
    return windows(n) * 2

print(layout(3).tolist(), windows(3).tolist(), sorted(set(threads)))
"""


def test_a_build_that_needs_another_cached_tensor_builds_it_on_the_same_thread():
    """On a GPU every cache miss is built by one worker thread; a miss inside a build (a layout
    asking for its windows) must not wait for that worker, which is busy with it (every GPU call
    hung so, 2026-12-07). Run in a process of its own: a hang there fails here by its timeout."""
    try:
        done = subprocess.run([sys.executable, "-c", _NESTED_BUILDS], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a build nested in another never returned (the builder thread waited for itself)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "[0, 2, 4] [0, 1, 2] ['bla-device-cache_0']"


def _region_with_a_cached_table(cache):
    """A compiled region whose op, at its first (eager) run, builds and caches a device table."""

    @cache
    def table(n: int, device: str) -> torch.Tensor:
        return torch.arange(n, device=device, dtype=torch.float32) * 2

    @torch.library.custom_op(f"bla_test::add_table_{id(table)}", mutates_args=())
    def add_table(x: torch.Tensor) -> torch.Tensor:
        return x + table(x.shape[-1], str(x.device))

    add_table.register_fake(lambda x: torch.empty_like(x))
    return torch.compile(lambda x: add_table(x * 3) + 1, mode="reduce-overhead")


@pytest.mark.gpu
def test_a_table_first_built_in_a_graph_trees_warm_up_stays_out_of_their_pool():
    x = torch.ones(4, 64, device="cuda")
    want = 3 * x + torch.arange(64, device="cuda") * 2 + 1
    region = _region_with_a_cached_table(device_cache(maxsize=4))
    for _ in range(4):  # warm-up, recording, replays
        torch.compiler.cudagraph_mark_step_begin()
        assert torch.equal(region(x).clone(), want)
    # the control: the same region with functools' cache fails at the recording after its warm-up
    region = _region_with_a_cached_table(functools.lru_cache(maxsize=4))
    with pytest.raises(RuntimeError, match="not tracked as outputs"):
        for _ in range(4):
            torch.compiler.cudagraph_mark_step_begin()
            region(x)
