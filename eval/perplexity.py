"""Perplexity of a model on held-out documents: token loss, perplexity and bits per byte.

Each document is scored whole (``<bos> text <eos>``, every token after ``<bos>`` predicted).
A document longer than ``context`` (the training context) is fed in windows of that many
tokens through the decode caches: BLA layers carry their recurrent state across windows, SWA
layers their window, and full-attention layers a sliding context of ``context`` tokens.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bla.data import DataSourceConfig, Tokenizer, load_documents
from bla.model import BLALM


@torch.no_grad()
def document_nll(model: BLALM, ids: list[int], context: int, device) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ids[1:] given the preceding tokens, and its count."""
    x = torch.tensor(ids, device=device)[None]
    cache = model.new_cache(max_context=context)
    total = 0.0
    for start in range(0, x.shape[1] - 1, context):
        window = x[:, start : start + context + 1]
        out = model(window[:, :-1], cache=cache)
        cache = out.cache
        total += float(F.cross_entropy(out.logits[0].float(), window[0, 1:], reduction="sum"))
    return total, x.shape[1] - 1


def perplexity(
    model: BLALM, tokenizer: Tokenizer, source: DataSourceConfig, context: int, max_docs: int | None = None,
    device="cpu", progress: bool = False,
) -> dict:  # fmt: skip
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"perplexity: context must be positive (tokens per scoring pass), got {context!r}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"perplexity: max_docs must be positive, got {max_docs}")
    model.eval()
    nll = tokens = nbytes = docs = 0
    texts = itertools.islice(load_documents(source), max_docs)
    for ex in tqdm(texts, desc="perplexity", disable=not progress, unit="doc"):
        ids = [tokenizer.bos_id, *tokenizer.encode(ex["text"]), tokenizer.eos_id]
        s, n = document_nll(model, ids, context, device)
        nll, tokens = nll + s, tokens + n
        nbytes += len(ex["text"].encode("utf-8"))
        docs += 1
    if tokens == 0:
        raise ValueError("perplexity: the source yielded no documents")
    loss = nll / tokens
    return {"docs": docs, "tokens": tokens, "bytes": nbytes, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "bits_per_byte": nll / math.log(2) / nbytes}  # fmt: skip
