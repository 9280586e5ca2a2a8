"""Packing documents into fixed-length training rows that keep the documents apart.

Each document becomes ``<bos> tokens <eos>`` with its own positions 0, 1, 2, ...; documents are
concatenated and cut into rows of ``seq_len + 1`` tokens that overlap by one (inputs are a
row's first ``seq_len`` tokens, labels its last ``seq_len``), so no token is lost at a cut. A
document cut across rows keeps its positions: the next row continues at the position where
the previous one stopped (BLA continues its phase there; RoPE its angle). The label that would
cross into the next document (``<eos>`` -> next ``<bos>``) is masked with -100.

A batch of rows is packed into one row of ``batch_size * seq_len`` tokens with ``cu_seqlens``
marking every segment (a document or the part of one inside a row), which is what the model
takes for packed input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .task import IGNORE


@dataclass
class Packer:
    """Stateful: ``add`` documents, ``pop_row`` full rows. ``state()`` is a few lists of ints."""

    seq_len: int
    bos_id: int
    eos_id: int
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {self.seq_len!r}")

    def add(self, ids: list[int]) -> None:
        doc = [self.bos_id, *ids, self.eos_id]
        self.tokens.extend(doc)
        self.positions.extend(range(len(doc)))

    def has_row(self) -> bool:
        return len(self.tokens) >= self.seq_len + 1

    def pop_row(self) -> dict[str, list[int]]:
        L = self.seq_len
        toks, pos = self.tokens[: L + 1], self.positions[: L + 1]
        labels = [t if p != 0 else IGNORE for t, p in zip(toks[1:], pos[1:])]  # no label across documents
        row = {"input_ids": toks[:L], "labels": labels, "positions": pos[:L]}
        del self.tokens[:L], self.positions[:L]  # keep the last token: it is the next row's first input
        return row

    def state(self) -> dict:
        return {"tokens": list(self.tokens), "positions": list(self.positions)}

    def load_state(self, state: dict) -> None:
        self.tokens, self.positions = list(state["tokens"]), list(state["positions"])


def segment_starts(positions: list[int]) -> list[int]:
    """Offsets in a row where a segment starts: the row start and every document start."""
    return [0] + [i for i, p in enumerate(positions) if p == 0 and i > 0]


def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Rows -> one packed row: input_ids, labels, positions [1, B*L] and cu_seqlens [N + 1] (int32)."""
    L = len(rows[0]["input_ids"])
    cu = []
    for r, row in enumerate(rows):
        cu.extend(r * L + s for s in segment_starts(row["positions"]))
    cu.append(len(rows) * L)
    cat = lambda key: torch.tensor([t for row in rows for t in row[key]], dtype=torch.long)[None]  # noqa: E731
    return {
        "input_ids": cat("input_ids"),
        "labels": cat("labels"),
        "positions": cat("positions"),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
    }


def pad_cu_seqlens(cu_seqlens: torch.Tensor, minimum: int = 8) -> torch.Tensor:
    """``cu_seqlens`` with empty documents appended, to a power-of-two length (at least
    ``minimum``): batches with different numbers of documents then share a few shapes, so that a
    compiled, graph-replayed model records a graph per shape, not one per batch. The model gives
    the same results with and without the empty documents."""
    n = cu_seqlens.numel()
    if n < 1:
        raise ValueError("pad_cu_seqlens: cu_seqlens needs at least one offset")
    size = max(minimum, 1 << (n - 1).bit_length())
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(size - n)])

