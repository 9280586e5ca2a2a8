"""Device tensors kept across calls (kernel tables, dense layouts, window lists), built outside any
CUDA graph's memory pool.

Inductor's CUDA graph trees (``torch.compile(mode="reduce-overhead")``) run a compiled region's
first call as a warm-up whose allocations, every one the calling thread makes, come from the
graphs' private pool. A table made and cached during that call would stay alive in the pool
without being any graph's output, and the next recording refuses to go on ("tensor(s) in the
cudagraph pool not tracked as outputs": the trainer's ``cuda_graphs=true`` failed so on an H100,
2026-12-07). So a cache miss builds its tensors on a thread of its own (and a stream of its own):
they come from the ordinary allocator, whatever region the calling thread is warming up.
A build that needs another cached tensor (a layout and its windows) builds it in place on that
thread: handing it to the one worker, which is busy with the outer build, would wait forever
(every GPU call hung so on an H100, 2026-12-07).
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_ON_BUILDER = threading.local()  # .active: this thread is the builder, inside a build


@functools.cache
def _builder() -> ThreadPoolExecutor:
    """The one worker thread that builds cached device tensors (made at the first CUDA build)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="bla-device-cache")


def _on_builder_thread(build, device: int, wait_for: list[torch.cuda.Stream], args, kwargs):
    with torch.cuda.device(device):
        if device not in _SIDE_STREAMS:
            _SIDE_STREAMS[device] = torch.cuda.Stream(device)
        side = _SIDE_STREAMS[device]
        # the side stream's memory is reused only by later builds, each of which first waits for
        # the streams that may still use what it reuses (an evicted entry's last users)
        for stream in wait_for:
            side.wait_stream(stream)
        _ON_BUILDER.active = True
        try:
            with torch.cuda.stream(side):
                return build(*args, **kwargs), side
        finally:
            _ON_BUILDER.active = False


def build_outside_graph_pools(build, *args, **kwargs):
    """``build(*args, **kwargs)`` with its CUDA allocations outside whatever graph pool the calling
    thread allocates to. While a graph is being captured, or a region traced, the build runs as
    it is (a capture replays a warmed-up call, whose cache misses have been built already), and
    so does a build asked for by another build (already on the builder thread and its stream)."""
    if getattr(_ON_BUILDER, "active", False) or not torch.cuda.is_initialized() or torch.cuda.is_current_stream_capturing() \
            or torch.compiler.is_compiling():  # fmt: skip
        return build(*args, **kwargs)
    current = torch.cuda.current_stream()
    device = current.device.index
    wait_for = [current, torch.cuda.default_stream(device)]
    out, side = _builder().submit(_on_builder_thread, build, device, wait_for, args, kwargs).result()
    current.wait_stream(side)
    return out


def device_cache(maxsize: int):
    """``functools.lru_cache(maxsize)`` for functions that build device tensors: each miss builds
    outside CUDA graph pools (``build_outside_graph_pools``)."""

    def wrap(build):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args, **kwargs):
            return build_outside_graph_pools(build, *args, **kwargs)

        return cached

    return wrap
