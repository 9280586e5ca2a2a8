"""Resumable, sharded loaders of packed batches, over a streamed source or pre-tokenised shards.

Sharding. Data-parallel rank ``r`` with ``W`` loader workers owns the logical shards
``r * W + w``; document ``i`` of the stream belongs to shard ``i mod (world_size * W)``. So
within an epoch every document is read by exactly one (rank, worker), and the streamed and
the shard-backed loaders (same document order) give identical token streams.

Resume. A logical worker's state is (epoch, next document index, the packer's buffer); each
batch carries the state its worker had right after making it. ``state_dict()`` holds the last
state of every worker and which worker serves next, so a loader restored mid-stream yields
exactly the batches the uninterrupted one would have, with or without worker processes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .packing import Packer, collate
from .shards import ShardDocuments
from .sources import DataSourceConfig, iterate_as_main_process, load_documents
from .tokenizer import Tokenizer


class DocumentSource(Protocol):
    def iter_from(self, start: int, shard: int, num_shards: int) -> Iterator[tuple[int, list[int]]]: ...


class StreamDocuments:
    """Documents streamed through ``datasets`` and tokenised on the fly (in the worker)."""

    def __init__(self, source: DataSourceConfig, tokenizer_path: str | Path):
        self.source, self.tokenizer_path = source, str(tokenizer_path)
        self._tok: Tokenizer | None = None

    def iter_from(self, start: int, shard: int, num_shards: int) -> Iterator[tuple[int, list[int]]]:
        if self._tok is None:
            self._tok = Tokenizer(self.tokenizer_path)
        for i, ex in enumerate(iterate_as_main_process(load_documents(self.source))):
            if i >= start and i % num_shards == shard:  # skip before tokenising
                yield i, self._tok.encode(ex["text"])



@dataclass
class LoaderConfig:
    seq_len: int = 1024
    batch_size: int = 8  # rows per batch (packed into one row of batch_size * seq_len tokens)
    num_workers: int = 0
    rank: int = 0
    world_size: int = 1
    loop: bool = True  # cycle epochs forever (training); False: one epoch, last rows padded

    def validate(self) -> "LoaderConfig":
        for name in ("seq_len", "batch_size", "world_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"loader: {name} must be a positive int, got {getattr(self, name)!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"loader: rank {self.rank} is outside world_size {self.world_size}")
        if self.num_workers < 0:
            raise ValueError(f"loader: num_workers must be >= 0, got {self.num_workers}")
        return self


def fresh_worker_state() -> dict:
    return {"epoch": 0, "next_doc": 0, "packer": {"tokens": [], "positions": []}}


def worker_batches(
    docs: DocumentSource, cfg: LoaderConfig, tokenizer_ids: tuple[int, int, int], shard: int, num_shards: int, state: dict
) -> Iterator[tuple[dict, dict]]:
    """Batches of one logical shard and, with each, the shard's state right after it."""
    pad_id, bos_id, eos_id = tokenizer_ids
    packer = Packer(cfg.seq_len, bos_id, eos_id)
    packer.load_state(state["packer"])
    epoch, next_doc = state["epoch"], state["next_doc"]
    rows: list[dict] = []
    while True:
        seen = 0
        for i, ids in docs.iter_from(next_doc, shard, num_shards):
            packer.add(ids)
            next_doc, seen = i + 1, seen + 1
            while packer.has_row():
                rows.append(packer.pop_row())
                if len(rows) == cfg.batch_size:
                    yield collate(rows), {"epoch": epoch, "next_doc": next_doc, "packer": packer.state()}
                    rows = []
        if seen == 0 and next_doc == 0:
            raise ValueError(
                f"loader shard {shard} of {num_shards} received no documents: the corpus has fewer documents "
                "than ranks x workers"
            )
        if not cfg.loop:
            rows.extend(_pad_rows(packer, cfg.seq_len, pad_id))
            for b in range(0, len(rows), cfg.batch_size):
                yield collate(rows[b : b + cfg.batch_size]), {"epoch": epoch + 1, "next_doc": 0, "packer": packer.state()}
            return
        epoch, next_doc = epoch + 1, 0


def _pad_rows(packer: Packer, seq_len: int, pad_id: int) -> list[dict]:
    """The rest of the buffer as rows filled up with ``pad`` for a final, non-looping epoch. Pads
    sit at position 0, so the packer masks every label that would predict or follow one."""
    rows = []
    while len(packer.tokens) > 1:
        missing = seq_len + 1 - len(packer.tokens)
        if missing > 0:
            packer.tokens += [pad_id] * missing
            packer.positions += [0] * missing
        rows.append(packer.pop_row())
    packer.tokens, packer.positions = [], []
    return rows


class _Workers(IterableDataset):
    """The logical shards of one rank spread over DataLoader workers; worker ``w`` plays logical
    worker ``(w + rotation) % W`` so a resumed loader continues the round-robin where it stopped."""

    def __init__(self, docs, cfg: LoaderConfig, ids, states: list[dict], rotation: int):
        self.docs, self.cfg, self.ids, self.states, self.rotation = docs, cfg, ids, states, rotation

    def __iter__(self):
        info = get_worker_info()
        W = self.cfg.num_workers
        logical = ((info.id if info else 0) + self.rotation) % W
        shard = self.cfg.rank * W + logical
        for batch, state in worker_batches(self.docs, self.cfg, self.ids, shard, self.cfg.world_size * W, self.states[logical]):
            yield batch, logical, state


class PackedLoader:
    """Iterate packed batches (dicts of tensors, see ``packing.collate``); resumable."""

    def __init__(self, docs: DocumentSource, tokenizer: Tokenizer, cfg: LoaderConfig):
        self.docs, self.cfg = docs, cfg.validate()
        self.ids = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
        self.logical_workers = max(1, cfg.num_workers)
        self.states = [fresh_worker_state() for _ in range(self.logical_workers)]
        self.next_worker = 0

    def __iter__(self) -> Iterator[dict]:
        W = self.logical_workers
        if self.cfg.num_workers == 0:
            shard, total = self.cfg.rank, self.cfg.world_size
            stream = ((b, 0, s) for b, s in worker_batches(self.docs, self.cfg, self.ids, shard, total, self.states[0]))
        else:
            dataset = _Workers(self.docs, self.cfg, self.ids, copy.deepcopy(self.states), self.next_worker)
            stream = iter(DataLoader(dataset, batch_size=None, num_workers=W, persistent_workers=False))
        for batch, logical, state in stream:
            self.states[logical] = state
            self.next_worker = (logical + 1) % W
            yield batch

    def state_dict(self) -> dict:
        return {"states": copy.deepcopy(self.states), "next_worker": self.next_worker,
                "world_size": self.cfg.world_size, "rank": self.cfg.rank, "num_workers": self.cfg.num_workers}  # fmt: skip

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["states"]) != self.logical_workers or sd["world_size"] != self.cfg.world_size:
            raise ValueError(
                f"loader state was saved with world_size={sd['world_size']} and {len(sd['states'])} worker(s); "
                f"this loader has world_size={self.cfg.world_size} and {self.logical_workers}: exact resume needs the same layout"
            )
        self.states, self.next_worker = copy.deepcopy(sd["states"]), sd["next_worker"]


def build_loader(
    cfg: LoaderConfig, tokenizer: Tokenizer, source: DataSourceConfig | None = None, shards: str | Path | None = None
) -> PackedLoader:
    """A loader over pre-tokenised ``shards`` (preferred when given) or the streamed ``source``."""
    if shards is not None:
        return PackedLoader(ShardDocuments(shards, tokenizer), tokenizer, cfg)
    if source is None:
        raise ValueError("build_loader needs a source or a shard directory")
    return PackedLoader(StreamDocuments(source, tokenizer.path), tokenizer, cfg)

