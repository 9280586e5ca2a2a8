"""Corpora, tokenizers, packing and resumable loaders."""

from .loader import LoaderConfig, PackedLoader, StreamDocuments, build_loader
from .packing import Packer, collate
from .shards import ShardDocuments, prepare
from .sources import DataSourceConfig, SourceConfig, load_documents, parse_source
from .tokenizer import Tokenizer, check_vocab, train_tokenizer

__all__ = [
    "DataSourceConfig", "LoaderConfig", "PackedLoader", "Packer", "ShardDocuments", "SourceConfig",
    "StreamDocuments", "Tokenizer", "build_loader", "check_vocab", "collate", "load_documents",
    "parse_source", "prepare", "train_tokenizer",
]  # fmt: skip
