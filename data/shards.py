"""Pre-tokenised shards: ``bla data prepare`` writes them once, loaders memory-map them.

A shard directory holds ``shard_NNNNN.bin`` (token ids, uint16 when the vocabulary fits, else
uint32), ``shard_NNNNN.idx.npy`` (int64 document offsets into the shard, length docs + 1),
the tokenizer file, and ``manifest.json`` (tokenizer hash and kind, dtype, counts, source),
written last and atomically: a directory without a manifest is an unfinished run.
Documents are stored without special tokens; the packer adds them, exactly as when streaming.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .sources import DataSourceConfig, load_documents
from .tokenizer import Tokenizer

MANIFEST = "manifest.json"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class _ShardWriter:
    """Appends documents to ``shard_NNNNN.bin`` files of about ``shard_tokens`` tokens each,
    writing each shard's document index when it closes."""

    def __init__(self, out: Path, dtype, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.offsets = [0]

    def add(self, ids: list[int]) -> None:
        if self.file is None:
            self.file = open(self.out / f"shard_{len(self.shards):05d}.bin", "wb")
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.offsets.append(self.offsets[-1] + len(ids))
        if self.offsets[-1] >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        n = len(self.shards)
        np.save(self.out / f"shard_{n:05d}.idx.npy", np.asarray(self.offsets, dtype=np.int64))
        self.shards.append({"bin": f"shard_{n:05d}.bin", "idx": f"shard_{n:05d}.idx.npy",
                            "docs": len(self.offsets) - 1, "tokens": self.offsets[-1]})  # fmt: skip
        self.file, self.offsets = None, [0]


def prepare(
    source: DataSourceConfig, tokenizer: Tokenizer, out_dir: str | Path, shard_tokens: int = 1 << 27,
    batch_docs: int = 64, max_docs: int | None = None, progress: bool = True,
) -> dict:  # fmt: skip
    """Tokenise ``source`` into shards under ``out_dir``; returns the manifest. The shards are
    built in a private folder beside it and moved into place whole, so concurrent or interrupted
    runs never leave a mix of two runs' files (the last to finish wins)."""
    final = Path(out_dir)
    if final.exists() and any(final.iterdir()) and not _is_shard_dir(final):
        raise ValueError(f"prepare: {final} exists and is not a shard directory (no {MANIFEST}): choose an empty --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    try:
        manifest = _prepare_into(out, source, tokenizer, shard_tokens, batch_docs, max_docs, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        final.rename(old)
    out.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _is_shard_dir(path: Path) -> bool:
    return (path / MANIFEST).exists() or all(p.name.startswith("shard_") or p.name.startswith("tokenizer")
                                             for p in path.iterdir())  # fmt: skip


def _prepare_into(out: Path, source, tokenizer, shard_tokens, batch_docs, max_docs, progress) -> dict:
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    writer = _ShardWriter(out, dtype, shard_tokens)
    total_docs = total_tokens = with_text = 0
    t0 = time.perf_counter()
    bar = tqdm(desc="tokenising", unit="tok", unit_scale=True, disable=not progress)
    texts = (ex["text"] for ex in itertools.islice(load_documents(source), max_docs))
    while batch := list(itertools.islice(texts, batch_docs)):
        for ids in tokenizer.encode_batch(batch):
            writer.add(ids)
            total_tokens += len(ids)
            bar.update(len(ids))
        total_docs += len(batch)
        with_text += sum(1 for text in batch if not text.isspace() and text)
    writer.close()
    bar.close()
    if total_docs == 0:
        raise ValueError("prepare: the source yielded no documents (empty corpus)")
    if total_tokens == 0 or with_text == 0:  # whitespace alone tokenises to a token or two: nothing to learn
        raise ValueError(f"prepare: the source's {total_docs} documents hold no text (each is empty or whitespace only)")
    print(f"prepare: {total_docs:,} documents, {total_tokens:,} tokens in {writer.shards} shard(s)", file=sys.stderr)
    seconds = time.perf_counter() - t0
    tokenizer.save(out)
    manifest = {
        "tokenizer": tokenizer.describe(), "dtype": np.dtype(dtype).name, "docs": total_docs,
        "tokens": total_tokens, "shards": writer.shards, "source": [s.describe() for s in source.sources],
        "seconds": seconds, "tokens_per_second": total_tokens / max(seconds, 1e-9),
    }  # fmt: skip
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _load_index(path: Path) -> np.ndarray:
    try:
        return np.load(path)  # allow_pickle=False: plain arrays only
    except (OSError, ValueError) as exc:
        raise ValueError(f"shard index {path} is missing or damaged ({exc}): re-run `bla data prepare`") from None


class ShardDocuments:
    """Documents of a shard directory by global index, memory-mapped."""

    def __init__(self, directory: str | Path, tokenizer: Tokenizer | None = None):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.exists():
            raise ValueError(f"{self.dir} holds no {MANIFEST}: not a finished `bla data prepare` output")
        try:
            self.manifest = json.loads(path.read_text())
            made_with = self.manifest["tokenizer"]["sha256"]
            self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
            dtype = np.dtype(self.manifest["dtype"])
            shards = [{"bin": s["bin"], "idx": s["idx"], "tokens": int(s["tokens"]), "docs": int(s["docs"])}
                      for s in self.manifest["shards"]]  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc}): re-run `bla data prepare`") from None
        same_ids = tokenizer is not None and tokenizer.encoding_sha256 == self.manifest["tokenizer"].get("encoding_sha256")
        if tokenizer is not None and tokenizer.sha256 != made_with and not same_ids:
            raise ValueError(
                f"shards in {self.dir} were made with tokenizer {made_with[:12]}..., "
                f"not with {tokenizer.path} ({tokenizer.sha256[:12]}...); re-run `bla data prepare`"
            )
        self._bins = [np.memmap(self.dir / s["bin"], dtype=dtype, mode="r") if s["tokens"] else np.zeros(0, dtype)
                      for s in shards]  # fmt: skip
        self._idx = [_load_index(self.dir / s["idx"]) for s in shards]
        for s, tokens, idx in zip(shards, self._bins, self._idx):
            if len(tokens) != s["tokens"] or len(idx) != s["docs"] + 1 or (len(idx) and idx[-1] != s["tokens"]):
                raise ValueError(
                    f"shard {self.dir / s['bin']} holds {len(tokens)} tokens and {len(idx) - 1} documents where "
                    f"{MANIFEST} says {s['tokens']} and {s['docs']} (truncated or changed): re-run `bla data prepare`"
                )
        self._names = [s["bin"] for s in shards]
        counts = [s["docs"] for s in shards]
        self._first_doc = np.cumsum([0] + counts)
        self.num_docs = int(self._first_doc[-1])

    def __len__(self) -> int:
        return self.num_docs

    def __getitem__(self, i: int) -> list[int]:
        s = int(np.searchsorted(self._first_doc, i, side="right") - 1)
        j = i - self._first_doc[s]
        a, b = self._idx[s][j], self._idx[s][j + 1]
        ids = self._bins[s][a:b]
        if ids.size and int(ids.max()) >= self.vocab_size:  # a changed byte (cheap to see per document)
            raise ValueError(f"shard {self.dir / self._names[s]}: document {i} holds token id "
                             f"{int(ids.max())}, beyond the tokenizer's {self.vocab_size} (damaged): re-run `bla data prepare`")  # fmt: skip
        return ids.astype(np.int64).tolist()

    def iter_from(self, start: int, shard: int, num_shards: int) -> Iterator[tuple[int, list[int]]]:
        first = start + (shard - start) % num_shards  # first index >= start in this shard
        for i in range(first, self.num_docs, num_shards):
            yield i, self[i]
