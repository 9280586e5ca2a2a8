"""The task ``lm``: next-token prediction on text sources, packed with their document boundaries.

Training streams ``data.sources`` (or the shards made from them), validation ``data.val_sources``;
the validation metrics are loss, perplexity and bits per byte. ``datasets`` and ``tokenizers``
load only when a loader is built, so synthetic-task runs never import them.
"""

from __future__ import annotations

import itertools

from .task import loss_metrics, loss_sums, register_task


def source_config(data, sources: list[str]):
    """``sources`` (strings of ``parse_source``) as one stream, with the data config's seed and mixture rule."""
    from .sources import DataSourceConfig, parse_source

    return DataSourceConfig([parse_source(s) for s in sources], seed=data.seed, mixture=data.mixture)


class TextTask:
    name, needs_text = "lm", True  # validation is other text (data.val_sources), not another seed stream

    def check(self, data, model_vocab: int) -> list[str]:
        problems = []
        if not data.sources:
            problems.append("data.sources is empty")
        if data.mixture not in ("all_exhausted", "first_exhausted"):
            problems.append(f"data.mixture must be all_exhausted or first_exhausted, got {data.mixture!r}")
        if data.tokenizer_kind not in ("bpe", "sentencepiece"):
            problems.append(f"data.tokenizer_kind must be bpe or sentencepiece, got {data.tokenizer_kind!r}")
        return problems

    def train_loader(self, data, micro_batch, rank, world, tokenizer=None, shards=None):
        from .loader import LoaderConfig, build_loader

        cfg = LoaderConfig(data.seq_len, micro_batch, data.num_workers, rank, world, loop=True)
        return build_loader(cfg, tokenizer, source_config(data, data.sources), shards)

    def eval_sums(self, score, data, micro_batch, batches, rank, world, tokenizer=None):
        from .loader import LoaderConfig, build_loader

        cfg = LoaderConfig(data.seq_len, micro_batch, 0, rank, world, loop=True)
        held_out = build_loader(cfg, tokenizer, source=source_config(data, data.val_sources))
        return loss_sums(score, itertools.islice(held_out, batches), accuracy=False, tokenizer=tokenizer)

    def eval_metrics(self, sums):
        import math

        bits_per_byte = sums["nll"] / math.log(2) / max(sums["bytes"], 1.0)  # comparable across tokenizers
        return {**loss_metrics(sums), "val_bits_per_byte": bits_per_byte}

    def test_scores(self, model, data, device, **options) -> dict:
        raise ValueError("the lm task has no held-out test of its own: use `bla eval perplexity` or `bla eval harness`")


LM = register_task(TextTask())
