"""Where each program of a call works: sequences, chunks and forward segments as int32 device
tensors, built once per shape (dense rows) or once per packed batch (``cu_seqlens``).

Packed documents' layout is built from their lengths on the host (one device read per batch),
except while a CUDA graph is being captured (or under ``static_layouts()``): then it is built on
the device with every size at its upper bound (``StaticLayout``), so that a replayed graph reads
each batch's boundaries instead of keeping the captured batch's."""

from __future__ import annotations

import collections
import contextlib

import torch

from .checks import Problem
from .device_cache import build_outside_graph_pools, device_cache


def _as32(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.int32).contiguous()


@device_cache(maxsize=64)
def _device_windows(windows: tuple[int, ...], device: str) -> torch.Tensor:
    """The windows as an int32 device tensor, made once (a host-to-device copy inside a CUDA graph's
    capture would copy from host memory freed by the time the graph replays)."""
    return _as32(torch.tensor(windows), device)


class Layout:
    """Sequences, chunks and forward segments of one call, as int32 device tensors (positions
    only: the offsets come with each call)."""

    def __init__(self, starts, lengths, windows: tuple[int, ...], device, chunk: int, seg_chunks: int):
        seq_ids = torch.arange(len(lengths))
        n_chunks = (lengths + chunk - 1) // chunk
        self.total_chunks = int(n_chunks.sum())
        chunk_base = torch.cumsum(n_chunks, 0) - n_chunks
        chunk_seq = torch.repeat_interleave(seq_ids, n_chunks)
        chunk_idx = torch.arange(self.total_chunks) - chunk_base[chunk_seq]
        n_items = torch.clamp((n_chunks + seg_chunks - 1) // seg_chunks, min=1)  # an empty sequence still has one
        item_base = torch.cumsum(n_items, 0) - n_items
        item_seq = torch.repeat_interleave(seq_ids, n_items)
        self.total_items = int(n_items.sum())
        item_chunk = (torch.arange(self.total_items) - item_base[item_seq]) * seg_chunks
        self.starts, self.lengths = _as32(starts, device), _as32(lengths, device)
        self.chunk_base = _as32(chunk_base, device)
        self.chunk_seq, self.chunk_idx = _as32(chunk_seq, device), _as32(chunk_idx, device)
        self.item_base, self.item_count = _as32(item_base, device), _as32(n_items, device)
        self.item_seq, self.item_chunk = _as32(item_seq, device), _as32(item_chunk, device)
        # each segment's chunks (the backward scans them, then the segments), and each chunk's segment
        self.item_chunk_first = _as32(chunk_base[item_seq] + item_chunk, device)
        self.item_chunk_count = _as32((n_chunks[item_seq] - item_chunk).clamp(0, seg_chunks), device)
        self.chunk_item = _as32(item_base[chunk_seq] + chunk_idx // seg_chunks, device)
        self.windows = _device_windows(tuple(windows), str(device))
        self._n_items, self._item_base, self._device, self._groups = n_items, item_base, device, {}
        self.longest_items = int(n_items.max()) if len(n_items) else 0  # segments of the longest sequence
        self.num_seqs = len(lengths)  # rows of the scans' per-sequence states

    def seq_offsets(self, offset: torch.Tensor) -> torch.Tensor:
        """Each sequence's phase offset, int32 on the layout's device."""
        return offset.to(device=self._device, dtype=torch.int32)

    def segment_groups(self, group: int) -> "SegmentGroups":
        """The segments cut into runs of ``group`` for the two-level segment scan (built once)."""
        if group not in self._groups:  # kept with the layout: built outside CUDA graph pools, as the layout is
            self._groups[group] = build_outside_graph_pools(SegmentGroups, self._n_items, self._item_base, group, self._device)
        return self._groups[group]


class SegmentGroups:
    """Each sequence's segments in runs of at most ``group`` (the last run shorter), for a scan in
    two levels: every run from a zero carry (all runs in parallel), then the runs' totals along
    each sequence (a chain ``group`` times shorter), then each segment's share of its run's carry."""

    def __init__(self, n_items: torch.Tensor, item_base: torch.Tensor, group: int, device):
        n_runs = (n_items + group - 1) // group
        run_base = torch.cumsum(n_runs, 0) - n_runs
        run_seq = torch.repeat_interleave(torch.arange(len(n_items)), n_runs)
        in_seq = (torch.arange(int(n_runs.sum())) - run_base[run_seq]) * group  # a run's first segment in its sequence
        first = item_base[run_seq] + in_seq
        count = torch.minimum(n_items[run_seq] - in_seq, torch.tensor(group))
        self.first, self.count = _as32(first, device), _as32(count, device)
        self.last = (first + count - 1).to(device)  # int64: index tensors
        self.first_index = first.to(device)
        self.run_base, self.run_count = _as32(run_base, device), _as32(n_runs, device)
        self.item_run = torch.repeat_interleave(torch.arange(len(first)), count).to(device)
        self.longest = int(n_items.max()) if len(n_items) else 0


class StaticLayout:
    """A packed batch's layout built on the device, no host read, every size at its bound: N + 1
    sequences (the last a dummy of length 0 past the tokens), ``tokens // chunk + N`` chunks and
    ``ceil(chunks / seg_chunks) + N`` segments, the rows ``saved_rows`` gives the saved buffers.
    Chunks and segments past the documents' belong to the dummy: their programs find no tokens
    (chunk 0 of an empty sequence), and the scans walk at most one of its segments."""

    def __init__(self, cu_seqlens: torch.Tensor, tokens: int, windows: tuple[int, ...], device, chunk: int, seg_chunks: int):
        n = cu_seqlens.numel() - 1
        self.total_chunks = tokens // chunk + n
        self.total_items = -(-self.total_chunks // seg_chunks) + n
        self.num_seqs, self.longest_items = n + 1, 0  # one-level segment scans only (their choice would read the device)
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        lengths = torch.cat([cu[1:] - cu[:-1], cu.new_zeros(1)])
        n_chunks = (lengths + chunk - 1) // chunk
        n_items = torch.clamp((n_chunks + seg_chunks - 1) // seg_chunks, min=1)
        n_chunks[n] = self.total_chunks - n_chunks[:n].sum()  # the dummy takes the rest of the rows
        n_items[n] = self.total_items - n_items[:n].sum()
        seq_ids = torch.arange(n + 1, device=device)
        chunk_base = torch.cumsum(n_chunks, 0) - n_chunks
        chunk_seq = torch.repeat_interleave(seq_ids, n_chunks, output_size=self.total_chunks)
        dummy_chunk = chunk_seq == n
        chunk_idx = torch.where(dummy_chunk, 0, torch.arange(self.total_chunks, device=device) - chunk_base[chunk_seq])
        item_base = torch.cumsum(n_items, 0) - n_items
        item_seq = torch.repeat_interleave(seq_ids, n_items, output_size=self.total_items)
        dummy_item = item_seq == n
        item_chunk = torch.where(dummy_item, 0, (torch.arange(self.total_items, device=device) - item_base[item_seq]) * seg_chunks)
        self.starts, self.lengths = _as32(torch.cat([cu[:-1], cu[-1:]]), device), _as32(lengths, device)
        self.chunk_base = _as32(chunk_base, device)
        self.chunk_seq, self.chunk_idx = _as32(chunk_seq, device), _as32(chunk_idx, device)
        # the scans walk each sequence's segments: the dummy's first only (none when it has none)
        self.item_base, self.item_count = _as32(item_base, device), _as32(torch.cat([n_items[:n], n_items[n:].clamp(max=1)]), device)
        self.item_seq, self.item_chunk = _as32(item_seq, device), _as32(item_chunk, device)
        self.item_chunk_first = _as32(chunk_base[item_seq] + item_chunk, device)
        count = (n_chunks[item_seq] - item_chunk).clamp(0, seg_chunks)
        self.item_chunk_count = _as32(torch.where(dummy_item, 0, count), device)
        chunk_item = item_base[chunk_seq] + chunk_idx // seg_chunks
        self.chunk_item = _as32(chunk_item.clamp(max=self.total_items - 1), device)
        self.windows = _device_windows(tuple(windows), str(device))
        self._device = device

    def seq_offsets(self, offset: torch.Tensor) -> torch.Tensor:
        """Each sequence's phase offset and the dummy's (0), int32 on the device."""
        offset = offset.to(device=self._device, dtype=torch.int32)
        return torch.cat([offset, offset.new_zeros(1)])

    def segment_groups(self, group: int) -> None:
        return None  # no two-level segment scan: the runs' sizes would be read from the device


_FORCED_STATIC = [False]


@contextlib.contextmanager
def static_layouts():
    """Build packed batches' layouts on the device (``StaticLayout``) inside this block, as while a
    CUDA graph is captured: for tests, which check it against the host-built layout."""
    _FORCED_STATIC.append(True)
    try:
        yield
    finally:
        _FORCED_STATIC.pop()


def _capturing(device) -> bool:
    return _FORCED_STATIC[-1] or (torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing())


@device_cache(maxsize=64)
def dense_layout(batch: int, seq_len: int, windows: tuple[int, ...], device: str, chunk: int, seg_chunks: int) -> Layout:
    """The layout of B equal sequences, built once per shape: no host-to-device copies per call."""
    starts = torch.arange(batch, dtype=torch.int64) * seq_len
    return Layout(starts, torch.full((batch,), seq_len, dtype=torch.int64), windows, device, chunk, seg_chunks)


_VARLEN_LAYOUTS: collections.OrderedDict = collections.OrderedDict()  # the last few packed batches' layouts


def layout(problem: Problem, device, chunk: int, seg_chunks: int) -> Layout:
    """The call's layout. Packed documents need their lengths on the host (one device read);
    the layout is kept for the same ``cu_seqlens`` memory, so the layers of a model (forward and
    backward) read it once per batch, not once per call. The cache holds the tensor itself:
    while it lives, no other tensor has its memory, and a write to it changes its version."""
    p = problem
    if p.cu_seqlens is None:
        return dense_layout(p.batch, p.seq_len, p.windows, str(device), chunk, seg_chunks)
    if _capturing(device):  # no host read, nothing cached: each replay reads its batch's cu_seqlens
        return StaticLayout(p.cu_seqlens, p.batch * p.seq_len, p.windows, device, chunk, seg_chunks)
    cu = p.cu_seqlens
    key = (cu.data_ptr(), cu.numel(), cu.dtype, str(device), p.windows, chunk, seg_chunks)
    hit = _VARLEN_LAYOUTS.get(key)
    if hit is not None and hit[1] == cu._version:
        _VARLEN_LAYOUTS.move_to_end(key)
        return hit[2]
    host = cu.cpu()
    # kept across calls, so built outside CUDA graph pools (a graph trees' warm-up would keep it in
    # theirs, and their recording refuses a pool tensor that is no graph's output: packed batches with
    # cuda_graphs=true failed so on an H100, 2026-12-07)
    layout = build_outside_graph_pools(Layout, host[:-1], host[1:] - host[:-1], p.windows, device, chunk, seg_chunks)
    _VARLEN_LAYOUTS[key] = (cu, cu._version, layout)
    while len(_VARLEN_LAYOUTS) > 8:
        _VARLEN_LAYOUTS.popitem(last=False)
    return layout
