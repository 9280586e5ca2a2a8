"""What a run builds or reads before its first step: the tokenizer and the token shards (built
once and cached, published atomically so concurrent runs share them), and ``init_from``'s weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from bla import data as lm_data  # loads text-data modules (datasets, tokenizers) on first use only
from bla.model import ModelConfig

from .config import TrainConfig


def _publish(tmp: Path, final: Path) -> None:
    """Move a cache entry built under a private name into place. Concurrent runs (``bla sweep
    --jobs``) may build the same entry; the first rename wins and the others drop their copy."""
    try:
        tmp.rename(final)
    except OSError:  # ``final`` exists and is not empty
        shutil.rmtree(tmp)


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def architecture(c: ModelConfig) -> dict:
    """A model config flattened (``bla.*`` dotted), without the BLA backend: how BLA is computed,
    not what."""
    d = c.to_dict()
    return {**{k: v for k, v in d.items() if k != "bla"}, **{f"bla.{k}": v for k, v in d["bla"].items() if k != "backend"}}


def architecture_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The model config keys on which two models compute differently."""
    fa, fb = architecture(a), architecture(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def initial_weights(cfg: TrainConfig, log):
    """(model, tokenizer or None) of ``cfg.init_from``, refused unless its architecture is this run's."""
    from .export import load_model

    model, tok, _ = load_model(cfg.init_from)
    diff = architecture_diff(cfg.model, model.cfg)
    if diff:
        raise ValueError(f"init_from={cfg.init_from}: its model config differs from this run's in {diff}")
    log(f"initial weights from {cfg.init_from}" + (f" (and its tokenizer {tok.path})" if tok is not None else ""))
    return model, tok


def _sources_key(d) -> tuple:
    """What names a training stream in cache keys (the mixture rule only matters for several sources)."""
    return (d.sources, d.mixture) if len(d.sources) > 1 else (d.sources,)


def ensure_tokenizer(cfg: TrainConfig, rank: int, log) -> lm_data.Tokenizer:
    """The configured tokenizer, or one trained on the training sources and cached."""
    d = cfg.data
    if d.tokenizer != "auto":
        return lm_data.Tokenizer(d.tokenizer)
    cache = Path(cfg.cache_dir).expanduser() / "tokenizers" / _cache_key(*_sources_key(d), d.tokenizer_kind, cfg.model.vocab_size)
    name = "tokenizer.json" if d.tokenizer_kind == "bpe" else "tokenizer.model"
    if rank == 0 and not (cache / name).exists():
        log(f"training a {d.tokenizer_kind} tokenizer of {cfg.model.vocab_size} tokens on {d.sources} -> {cache}")
        texts = (ex["text"] for ex in lm_data.load_documents(lm_data.source_config(d, d.sources)))
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        lm_data.train_tokenizer(texts, tmp, kind=d.tokenizer_kind, vocab_size=cfg.model.vocab_size,
                                progress=cfg.progress)  # fmt: skip
        _publish(tmp, cache)
    dist.barrier()
    return lm_data.Tokenizer(cache / name)


def ensure_shards(cfg: TrainConfig, tok: lm_data.Tokenizer, rank: int, log) -> Path | None:
    d = cfg.data
    if d.shards == "none":
        return None
    if d.shards != "auto":
        return Path(d.shards)
    # keyed by what decides the ids: an export's copy of the tokenizer reads the same shards
    out = Path(cfg.cache_dir).expanduser() / "shards" / _cache_key(*_sources_key(d), tok.encoding_sha256)
    if rank == 0 and not (out / "manifest.json").exists():
        log(f"tokenising {d.sources} once into shards at {out}")
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        source = lm_data.source_config(d, d.sources)
        lm_data.prepare(source, tok, tmp, progress=cfg.progress)
        if out.exists() and not (out / "manifest.json").exists():
            shutil.rmtree(out)  # a partial directory left by an interrupted run of an older version
        _publish(tmp, out)
    dist.barrier()
    return out
