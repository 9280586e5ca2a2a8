"""Perplexity of a model on held-out documents: token loss, perplexity and bits per byte.

Each document is scored whole (``<bos> text <eos>``, every token after ``<bos>`` predicted).
A document longer than ``context`` (the training context) is fed in windows of that many
tokens through the decode caches: BLA layers carry their recurrent state across windows, SWA
layers their window, and full-attention layers a sliding context of ``context`` tokens.

The loss is also given by the predicted token's position in its document, in buckets whose
edges double from 64 (``loss_by_position``): whether a mixer's state carries information past
its window shows as loss that keeps falling at positions beyond it (issue 44).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bla.data import DataSourceConfig, Tokenizer, load_documents
from bla.model import BLALM


def position_edges(longest: int, first: int = 64) -> list[int]:
    """Bucket edges 0, first, 2 first, 4 first, ... up to past ``longest`` positions."""
    edges = [0, first]
    while edges[-1] < longest:
        edges.append(2 * edges[-1])
    return edges


@torch.no_grad()
def token_nll(model: BLALM, ids: list[int], context: int, device) -> torch.Tensor:
    """Negative log-likelihood (nats, float64 [len(ids) - 1], on the CPU) of each of ids[1:] given
    the tokens before it."""
    x = torch.tensor(ids, device=device)[None]
    cache = model.new_cache(max_context=context)
    parts = []
    for start in range(0, x.shape[1] - 1, context):
        window = x[:, start : start + context + 1]
        out = model(window[:, :-1], cache=cache)
        cache = out.cache
        parts.append(F.cross_entropy(out.logits[0].float(), window[0, 1:], reduction="none").double().cpu())
    return torch.cat(parts)


def document_nll(model: BLALM, ids: list[int], context: int, device) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ids[1:] given the preceding tokens, and its count."""
    nll = token_nll(model, ids, context, device)
    return float(nll.sum()), nll.numel()


def by_position(nll_sums: torch.Tensor, counts: torch.Tensor, edges: list[int]) -> list[dict]:
    """Per-position sums and counts [positions] -> the mean loss of each non-empty bucket [a, b)."""
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        n = int(counts[a:b].sum())
        if n:
            rows.append({"from": a, "to": b, "tokens": n, "loss": float(nll_sums[a:b].sum()) / n})
    return rows


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
    at_position, count = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)  # by predicted token's position
    texts = itertools.islice(load_documents(source), max_docs)
    for ex in tqdm(texts, desc="perplexity", disable=not progress, unit="doc"):
        ids = [tokenizer.bos_id, *tokenizer.encode(ex["text"]), tokenizer.eos_id]
        doc = token_nll(model, ids, context, device)
        n = doc.numel() + 1  # the predicted tokens sit at positions 1..n-1 (<bos> at 0)
        if n > at_position.numel():
            grow = n - at_position.numel()
            at_position, count = (torch.cat([t, torch.zeros(grow, dtype=torch.float64)]) for t in (at_position, count))
        at_position[1:n] += doc
        count[1:n] += 1
        nll, tokens = nll + float(doc.sum()), tokens + doc.numel()
        nbytes += len(ex["text"].encode("utf-8"))
        docs += 1
    if tokens == 0:
        raise ValueError("perplexity: the source yielded no documents")
    loss = nll / tokens
    return {"docs": docs, "tokens": tokens, "bytes": nbytes, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "bits_per_byte": nll / math.log(2) / nbytes,
            "loss_by_position": by_position(at_position, count, position_edges(count.numel()))}  # fmt: skip
