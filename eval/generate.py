"""Text generation with per-layer decode caches (BLA: its constant-size slot state).

``generate`` continues a batch of prompts of one length (a tensor), or of any lengths (a list):
then each is prefilled alone (one chunked call per layer over the prompt), the caches are
stacked into one batch, and every row decodes at its own position (BLA's phase is per
sequence: no padding enters a state or shifts a phase).
"""

from __future__ import annotations

import torch

from bla.model import BLALM, DecodeCache
from bla.model.decode import StaticDecoder, decodes_static_by_default


@torch.no_grad()
def generate(
    model: BLALM,
    prompts: torch.Tensor | list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    static: bool | None = None,
) -> torch.Tensor | list[list[int]]:
    """Continue prompts: a tensor [B, T0] of equal-length prompts (one prefill), or a list of id
    lists of any lengths (each prefilled alone, then decoded together at its own position), then
    one cached step per token for the whole batch.

    ``temperature`` 0 is greedy (argmax); otherwise sample from softmax(logits / temperature),
    restricted to the ``top_k`` most likely tokens and/or the smallest set of probability
    ``top_p``. A tensor gives [B, T0 + n] (rows stop growing after ``eos_id``; shorter rows get
    eos); a list gives each prompt followed by its new tokens, up to and including ``eos_id``.
    Greedy rows of a list equal those of each prompt alone.

    ``static`` decodes over preallocated buffers (``bla.model.decode.StaticDecoder``; on CUDA
    each step is one captured graph); None picks it on CUDA when every mixer supports it.
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    as_tensor = isinstance(prompts, torch.Tensor)
    if as_tensor and (prompts.dim() != 2 or prompts.shape[1] == 0):
        raise ValueError(f"prompt_ids must be [B, T0] with T0 >= 1, got {tuple(prompts.shape)}")
    if not as_tensor and (not prompts or any(len(p) == 0 for p in prompts)):
        raise ValueError(f"prompts must be a non-empty list of non-empty id lists, got lengths {[len(p) for p in prompts]}")
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    if static is None:
        static = decodes_static_by_default(model)
    step, logits = _prefill(model, prompts, max_new_tokens, static, device)
    new = _continue(step, logits, max_new_tokens, temperature, top_k, top_p, eos_id, seed)
    if as_tensor:
        return torch.cat([prompts, new.to(prompts.device)], dim=1)
    rows = new.tolist()
    ends = [row.index(eos_id) + 1 if eos_id in row else len(row) for row in rows]
    return [list(p) + row[:end] for p, row, end in zip(prompts, rows, ends)]


def _prefill(model, prompts, max_new_tokens: int, static: bool, device):
    """The prompts through the model: a step function (next tokens [B] -> logits [B, V]) and the
    logits after each prompt. A list is prefilled prompt by prompt (its own length, position and
    phase); static: into a StaticDecoder's buffers, else into caches stacked into one batch."""
    if static:
        longest = prompts.shape[1] if isinstance(prompts, torch.Tensor) else max(len(p) for p in prompts)
        decoder = StaticDecoder(model, len(prompts), longest + max_new_tokens)
        return decoder.step, decoder.prefill(prompts)
    if isinstance(prompts, torch.Tensor):
        out = model(prompts.to(device), cache=model.new_cache(), logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]
    else:
        outs = [model(torch.tensor([p], device=device), cache=model.new_cache(), logits_to_keep=1) for p in prompts]
        cache, logits = DecodeCache.stack([o.cache for o in outs]), torch.cat([o.logits[:, -1] for o in outs])
    state = {"cache": cache}

    def step(tokens: torch.Tensor) -> torch.Tensor:
        out = model(tokens[:, None], cache=state["cache"])
        state["cache"] = out.cache
        return out.logits[:, -1]

    return step, logits


def _continue(step, logits, max_new_tokens: int, temperature, top_k, top_p, eos_id, seed) -> torch.Tensor:
    """[B, n] new tokens from the prompts' last ``logits``, ``step`` feeding each back; rows that
    ended with ``eos_id`` repeat it until every row has (or n = max_new_tokens)."""
    gen = torch.Generator(device=logits.device)
    if seed is not None:
        gen.manual_seed(seed)
    tokens = [logits.new_zeros(logits.shape[0], 0, dtype=torch.long)]
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for _ in range(max_new_tokens):
        nxt = _pick(logits.float(), temperature, top_k, top_p, gen)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens.append(nxt[:, None])
        if (eos_id is not None and bool(done.all())) or len(tokens) == max_new_tokens + 1:
            break  # every row ended, or the last token (it needs no step after it)
        logits = step(nxt)
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
