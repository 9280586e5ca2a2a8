"""Text generation with per-layer decode caches (BLA: its constant-size slot state)."""

from __future__ import annotations

import torch

from bla.model import BLALM


@torch.no_grad()
def generate(
    model: BLALM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Continue ``prompt_ids`` [B, T0]: one prefill, then one cached step per token.

    ``temperature`` 0 is greedy (argmax); otherwise sample from softmax(logits / temperature),
    restricted to the ``top_k`` most likely tokens and/or the smallest set of probability
    ``top_p``. Returns [B, T0 + n] (rows stop growing after ``eos_id``; shorter rows get eos).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [B, T0] with T0 >= 1, got {tuple(prompt_ids.shape)}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    gen = torch.Generator(device=prompt_ids.device)
    if seed is not None:
        gen.manual_seed(seed)
    model.eval()
    out = model(prompt_ids, cache=model.new_cache())
    cache, logits = out.cache, out.logits[:, -1]
    tokens = [prompt_ids]
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        nxt = _pick(logits.float(), temperature, top_k, top_p, gen)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens.append(nxt[:, None])
        if eos_id is not None and bool(done.all()):
            break
        out = model(nxt[:, None], cache=cache)
        cache, logits = out.cache, out.logits[:, -1]
    return torch.cat(tokens, dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
