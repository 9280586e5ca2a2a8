"""Document sources: hub datasets, local files, the embedded standard-library corpus, mixtures.

Every source becomes a ``datasets`` iterable of ``{"text": str}`` documents, streamed
(``streaming=True``), in a deterministic order. Describe one with ``SourceConfig`` or with the
string forms of ``parse_source``:

    stdlib[:train|:validation]            the embedded corpus (this Python's standard library)
    files:<glob>[#field]                   local txt / jsonl / json / parquet / arrow files; txt,
                                           jsonl and json also compressed (.gz, .bz2, .xz, .zst)
    hub:<name>[@config][:split][#field]    a Hugging Face hub dataset, a local dataset folder, or a
                                           folder written by ``save_to_disk``; ``?data_files=...&
                                           data_dir=...&revision=...`` after the name pass those on
"""

from __future__ import annotations

import functools
import glob as globlib
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import datasets

FILE_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # read through fsspec, as datasets reads them
HUB_OPTIONS = ("data_files", "data_dir", "revision")  # passed to datasets.load_dataset
VALIDATION_PERCENT = 2  # share of the embedded corpus held out


@dataclass
class SourceConfig:
    kind: str = "stdlib"  # stdlib | files | hub
    name: str = ""  # glob (files) or dataset name / folder (hub)
    config: str | None = None  # hub dataset config
    split: str = "train"
    text_field: str = "text"
    weight: float = 1.0  # in a mixture
    options: dict = field(default_factory=dict)  # hub: data_files, data_dir, revision

    def describe(self) -> str:
        if self.kind == "stdlib":
            return f"stdlib:{self.split}"
        extra = f"@{self.config}" if self.config else ""
        query = ("?" + "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))) if self.options else ""
        return f"{self.kind}:{self.name}{query}{extra}:{self.split}#{self.text_field}"


MIXTURES = ("all_exhausted", "first_exhausted")


@dataclass
class DataSourceConfig:
    """One source or a weighted mixture, sampled with a fixed seed: each next document comes from
    source i with probability weight_i / sum(weights). ``mixture`` says when the stream ends:
    ``all_exhausted`` (every document of every source seen at least once; smaller sources repeat
    while the largest runs out) or ``first_exhausted`` (at the first source that runs out; no
    document repeats, larger sources are cut short)."""

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    seed: int = 0
    mixture: str = "all_exhausted"


def parse_source(spec: str) -> SourceConfig:
    """``stdlib:validation``, ``files:data/*.jsonl#content``, ``hub:wikitext@wikitext-2-raw-v1:train``,
    optionally prefixed by ``<weight>*`` in a mixture."""
    weight = 1.0
    if "*" in spec.split(":", 1)[0]:
        w, spec = spec.split("*", 1)
        weight = float(w)
    kind, _, rest = spec.partition(":")
    text_field = "text"
    if "#" in rest:
        rest, text_field = rest.rsplit("#", 1)
    if kind == "stdlib":
        return SourceConfig("stdlib", split=rest or "train", weight=weight)
    if kind == "files":
        if not rest:
            raise ValueError("files source needs a glob: files:<glob>[#field]")
        return SourceConfig("files", rest, text_field=text_field, weight=weight)
    if kind == "hub":
        name, _, split = rest.partition(":")
        name, _, config = name.partition("@")
        name, _, query = name.partition("?")
        if not name:
            raise ValueError("hub source needs a dataset name: hub:<name>[?data_dir=...][@config][:split][#field]")
        options = dict(item.split("=", 1) if "=" in item else (item, "") for item in query.split("&") if item)
        unknown = sorted(set(options) - set(HUB_OPTIONS)) + [k for k, v in options.items() if not v]
        if unknown:
            raise ValueError(f"hub source {spec!r}: options must be {', '.join(HUB_OPTIONS)} as key=value, got {unknown}")
        return SourceConfig("hub", name, config or None, split or "train", text_field, weight, options)
    raise ValueError(f"unknown source kind {kind!r} in {spec!r}; expected stdlib, files or hub")


# ----------------------------------------------------------------------------- the embedded corpus


def stdlib_files(split: str) -> list[str]:
    """The standard library's .py files of this interpreter, sorted, split by a hash of the path."""
    if split not in ("train", "validation"):
        raise ValueError(f"stdlib split must be train or validation, got {split!r}")
    return list(_stdlib_split()[split])


@functools.cache
def _stdlib_split() -> dict[str, tuple[str, ...]]:
    # one walk a process (a run lists the corpus at every validation), and none through the
    # installed packages the stdlib folder may hold (ten times the stdlib's files)
    root = sysconfig.get_paths()["stdlib"]
    rels = []
    for folder, subfolders, names in os.walk(root):
        here = os.path.relpath(folder, root).replace(os.sep, "/")
        if here == ".":
            subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
        rels += [n if here == "." else f"{here}/{n}" for n in names if n.endswith(".py")]
    split = {"train": [], "validation": []}
    for rel in sorted(rels, key=lambda r: r.split("/")):  # pathlib's order: part by part
        held_out = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT
        split["validation" if held_out else "train"].append(os.path.join(root, rel))
    return {k: tuple(v) for k, v in split.items()}


def _read_files(files: list[str]) -> Iterator[dict]:
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield {"text": text}


# ----------------------------------------------------------------------------- loading
def iterate_as_main_process(ds) -> Iterator[dict]:
    """Iterate a ``datasets`` stream whole, even inside a DataLoader worker.

    Inside a torch worker ``datasets`` splits its own shards among the workers when iteration
    starts; our sharding is by document index (so streamed and shard loaders agree), so the
    worker info is hidden while the iterator starts, and only then.
    """
    from torch.utils.data._utils import worker as torch_worker

    saved = torch_worker._worker_info
    torch_worker._worker_info = None
    try:
        it = iter(ds)
        first = next(it, None)
    finally:
        torch_worker._worker_info = saved
    if first is None:
        return
    yield first
    yield from it



def _open(path: str):
    """A file's bytes, decompressed by its suffix (.gz, .bz2, .xz, .zst) through fsspec, which
    datasets reads compressed files with."""
    import fsspec

    return fsspec.open(path, "rb", compression="infer").open()


def _format_suffix(path: str) -> str:
    """A file's format suffix, under its compression suffix if it has one (.jsonl of .jsonl.gz)."""
    p = Path(path)
    return Path(p.stem).suffix if p.suffix in COMPRESSIONS else p.suffix


def _text_files(files: list[str]) -> Iterator[dict]:
    """One document per .txt file (compressed or not), strict UTF-8."""
    for f in files:
        try:
            with _open(f) as fh:
                yield {"text": fh.read().decode("utf-8")}
        except UnicodeDecodeError as exc:
            raise ValueError(f"{f} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _jsonl_files(files: list[str], field: str) -> Iterator[dict]:
    """One document per line of JSON Lines files (compressed or not): ``{field: "..."}``, named
    ``text`` downstream; errors name the file and line."""
    for f in files:
        with _open(f) as fh:
            for n, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{f}:{n}: not UTF-8 (byte {exc.start} of the line: {exc.reason})") from None
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{f}:{n}: not a JSON line ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{f}:{n}: a JSON {type(row).__name__}, expected an object with a field {field!r}")
                if field not in row:
                    raise ValueError(f"{f}:{n}: no text field {field!r}; its fields are {sorted(row)}")
                if not isinstance(row[field], str):
                    raise ValueError(f"{f}:{n}: field {field!r} holds {type(row[field]).__name__}, not text")
                yield {field: row[field]}


def _require_text(example: dict, index: int, where: str) -> dict:
    """Every document's text is a string, not only the first one's (a later int or null would
    otherwise reach the tokenizer as a traceback)."""
    if not isinstance(example["text"], str):
        raise ValueError(f"source {where}: document {index} has a text field of type {type(example['text']).__name__}, not text")
    return example


def _files_dataset(src: SourceConfig) -> datasets.IterableDataset:
    files = sorted(globlib.glob(os.path.expanduser(src.name), recursive=True))
    if not files:
        raise ValueError(f"files source: no file matches {src.name!r}")
    exts = {_format_suffix(f) for f in files}
    compressed = {_format_suffix(f) for f in files if Path(f).suffix in COMPRESSIONS}
    formats = {FILE_FORMATS.get(e) for e in exts}
    if None in formats or len(formats) != 1 or not compressed <= {".txt", ".jsonl", ".json"}:
        got = sorted({"".join(Path(f).suffixes[-2:]) if Path(f).suffix in COMPRESSIONS else Path(f).suffix for f in files})
        raise ValueError(f"files source: expected files of one format among {sorted(FILE_FORMATS)} (txt, jsonl and "
                         f"json also {'/'.join(COMPRESSIONS)}-compressed), got {got}")  # fmt: skip
    fmt = formats.pop()
    if all(os.path.getsize(f) == 0 for f in files):
        raise ValueError(f"source {src.describe()} is empty: every matching file has 0 bytes")
    if exts <= {".txt"}:  # our own readers: their errors name the file (and line)
        return datasets.IterableDataset.from_generator(_text_files, gen_kwargs={"files": files})
    if exts <= {".jsonl"}:
        return datasets.IterableDataset.from_generator(_jsonl_files, gen_kwargs={"files": files, "field": src.text_field})
    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    try:
        return datasets.load_dataset(fmt, data_files=files, split="train", streaming=True, **kwargs)
    except StopIteration as exc:  # datasets finds no row to infer the features from
        raise ValueError(f"source {src.describe()} is empty") from exc


def _saved_dataset(src: SourceConfig) -> datasets.IterableDataset:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (memory-mapped
    Arrow files), streamed like any other source."""
    try:
        ds = datasets.load_from_disk(os.path.expanduser(src.name))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError or its own errors
        raise ValueError(f"hub source {src.describe()}: cannot load the saved dataset folder {src.name!r}: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise ValueError(f"hub source {src.describe()}: the saved dataset has no split {src.split!r}; its splits are {sorted(ds)}")
        ds = ds[src.split]
    return ds.to_iterable_dataset()


def _is_saved_dataset(name: str) -> bool:
    folder = Path(os.path.expanduser(name))
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _hub_dataset(src: SourceConfig) -> datasets.IterableDataset:
    if _is_saved_dataset(src.name):
        return _saved_dataset(src)
    try:
        return datasets.load_dataset(src.name, src.config, split=src.split, streaming=True, **src.options)
    except (FileNotFoundError, ConnectionError, ValueError) as exc:
        raise ValueError(f"hub source {src.describe()}: cannot load dataset {src.name!r}: {exc}") from exc
    except Exception as exc:  # datasets raises its own DatasetNotFoundError and friends
        raise ValueError(f"hub source {src.describe()}: cannot load dataset {src.name!r}: {exc}") from exc


def load_source(src: SourceConfig) -> datasets.IterableDataset:
    """One source as a stream of ``{"text": ...}``, checked: it exists, is not empty, has the field."""
    if src.kind == "stdlib":
        files = stdlib_files(src.split)
        if not files:
            raise ValueError("the embedded corpus is empty: no standard-library sources found")
        return datasets.IterableDataset.from_generator(_read_files, gen_kwargs={"files": files})
    if src.kind == "files":
        ds = _files_dataset(src)
    elif src.kind == "hub":
        ds = _hub_dataset(src)
    else:
        raise ValueError(f"unknown source kind {src.kind!r}; expected stdlib, files or hub")
    first = next(iterate_as_main_process(ds.take(1)), None)
    if first is None:
        raise ValueError(f"source {src.describe()} is empty")
    if src.text_field not in first:
        raise ValueError(f"source {src.describe()}: no text field {src.text_field!r}; its fields are {sorted(first)}")
    if not isinstance(first[src.text_field], str):
        raise ValueError(f"source {src.describe()}: field {src.text_field!r} holds {type(first[src.text_field]).__name__}, not text")
    if src.text_field != "text":
        ds = ds.rename_column(src.text_field, "text")
    return ds.select_columns(["text"]).map(_require_text, with_indices=True, fn_kwargs={"where": src.describe()})


def load_documents(cfg: DataSourceConfig) -> datasets.IterableDataset:
    """The configured source, or a weighted mixture of several, as one document stream."""
    if not cfg.sources:
        raise ValueError("data config names no source")
    streams = [load_source(s) for s in cfg.sources]
    if len(streams) == 1:
        return streams[0]
    weights = [s.weight for s in cfg.sources]
    if any(w <= 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {weights}")
    if cfg.mixture not in MIXTURES:
        raise ValueError(f"mixture must be one of {MIXTURES}, got {cfg.mixture!r}")
    total = sum(weights)
    return datasets.interleave_datasets(
        streams, probabilities=[w / total for w in weights], seed=cfg.seed, stopping_strategy=cfg.mixture
    )
