"""Corpora, tokenizers, packing and resumable loaders.

Names load on first use (PEP 562): the synthetic tasks (``bla.data.synthetic``,
``bla.data.regbench``) need neither ``datasets`` nor ``tokenizers``. Tasks (``lm``, ``mqar``,
``regbench``) are found by name through ``task_named`` (``bla.data.tasks``).
"""

import importlib

_HOME = {
    "LoaderConfig": "loader", "PackedLoader": "loader", "StreamDocuments": "loader", "build_loader": "loader",
    "Packer": "packing", "collate": "packing",
    "ShardDocuments": "shards", "prepare": "shards",
    "DataSourceConfig": "sources", "SourceConfig": "sources", "load_documents": "sources", "parse_source": "sources",
    "Tokenizer": "tokenizer", "check_vocab": "tokenizer", "check_same_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "IGNORE": "task", "label_accuracy": "task", "task_named": "tasks", "task_names": "tasks", "source_config": "text",
}  # fmt: skip
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
