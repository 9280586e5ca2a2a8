"""Decoding over static per-layer buffers; on CUDA one step is one captured graph.

``StaticDecoder(model, batch, max_context)`` preallocates every layer's decode state (BLA: its
fp32 slot state; attn: keys and values for ``max_context`` tokens; swa: a ring of its window;
each with its short convolution's inputs) and the next position of each row. ``prefill`` runs
each prompt through the chunked path (one kernel call per layer over the prompt) and copies the
final states into the buffers; ``step(tokens)`` feeds one token per row and returns the logits.

A step reads and writes only those buffers, allocates nothing that depends on the context and
reads nothing back from the device, so on CUDA it is captured once (``torch.cuda.CUDAGraph``)
and replayed: one launch per token instead of a few hundred small ones from Python. Elsewhere
(the CPU, or ``graph=False``) the same ``_step`` runs eagerly: the captured path and its twin
share every line. Rows keep their own positions, so prompts of other lengths decode together
with their own BLA phases, no padding in any state.
"""

from __future__ import annotations

import torch

from .lm import BLALM, DecodeCache


def unsupported_mixers(model: BLALM) -> list[str]:
    """The kinds of ``model``'s mixers that have no static decode step (empty: it decodes statically)."""
    return sorted({b.kind for b in model.blocks if not hasattr(b.mixer, "decode_step")})


def decodes_static_by_default(model: BLALM) -> bool:
    """On CUDA, where the step is a captured graph, when every mixer supports it."""
    return next(model.parameters()).is_cuda and not unsupported_mixers(model)


class StaticDecoder:
    def __init__(self, model: BLALM, batch: int, max_context: int, graph: bool | None = None):
        missing = unsupported_mixers(model)
        if missing:
            raise ValueError(f"static decoding supports the bla, attn and swa mixers, not {missing}")
        if batch < 1 or max_context < 1:
            raise ValueError(f"need batch >= 1 and max_context >= 1, got {batch} and {max_context}")
        param = next(model.parameters())
        self.model, self.device, self.batch, self.max_context = model.eval(), param.device, batch, max_context
        self.use_graph = self.device.type == "cuda" if graph is None else graph
        self.layers = [b.mixer.static_buffers(batch, max_context, param.device, param.dtype) for b in model.blocks]
        self.position = torch.zeros(batch, dtype=torch.long, device=param.device)  # of each row's next token
        self.tokens = torch.zeros(batch, dtype=torch.long, device=param.device)
        self.longest = 0  # host-side: the largest position so far (attn's buffers end at max_context)
        self.graph, self.logits = None, None

    def nbytes(self) -> int:
        """Bytes of the decode state: every layer's buffers (constant for BLA, max_context for attn)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]] | torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Every row's prompt (a list of id lists, one per row, any lengths; or [B, T] equal lengths
        in one batched call) through the chunked path, one call per layer over the prompt (or
        ``chunk`` tokens at a time through the growing cache: sliding-window layers would
        otherwise build a T x T mask); returns the logits of each last token [B, V]."""
        rows = [prompts] if isinstance(prompts, torch.Tensor) else [torch.tensor([p], device=self.device) for p in prompts]
        if sum(r.shape[0] for r in rows) != self.batch or any(r.shape[1] == 0 for r in rows):
            raise ValueError(f"prefill needs {self.batch} non-empty prompts, got {[tuple(r.shape) for r in rows]}")
        longest = max(r.shape[1] for r in rows)
        if longest > self.max_context:
            raise ValueError(f"a prompt of {longest} tokens is longer than max_context={self.max_context}")
        outs = []
        for ids in rows:
            out, n = None, ids.shape[1]
            for start in range(0, n, chunk or n):
                piece = ids[:, start : start + (chunk or n)].to(self.device)
                out = self.model(piece, cache=out.cache if out is not None else self.model.new_cache(), logits_to_keep=1)
            outs.append(out)
        self.load(outs[0].cache if len(outs) == 1 else DecodeCache.stack([o.cache for o in outs]))
        return torch.cat([o.logits[:, -1] for o in outs])

    @torch.no_grad()
    def load(self, decode: DecodeCache) -> None:
        """The rows of a prefilled ``DecodeCache`` (bla.model.lm; several rows, each of its own
        length, as ``DecodeCache.stack`` makes them) into the buffers."""
        rows = decode.rows()
        if rows != self.batch:
            raise ValueError(f"a decode cache of {rows} rows does not fit a static decoder of batch {self.batch}")
        lengths = torch.as_tensor(decode.length).expand(rows).tolist()
        if max(lengths) > self.max_context:
            raise ValueError(f"a cache of {max(lengths)} tokens is longer than max_context={self.max_context}")
        for block, buf, cache in zip(self.model.blocks, self.layers, decode.layers):
            for r, n in enumerate(lengths):
                block.mixer.load_static(buf, r, _row_of(cache, r), n)
        self.position.copy_(torch.tensor(lengths, device=self.device))
        self.longest = max(lengths)

    @torch.no_grad()
    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the rows ``rows`` (beam search), in place: the buffers keep their memory, so a
        captured graph stays valid."""
        rows = rows.to(self.device)
        for layer in self.layers:
            for t in layer.values():
                t.copy_(t.index_select(0, rows))
        self.position.copy_(self.position.index_select(0, rows))

    @torch.no_grad()
    def grow(self, max_context: int) -> None:
        """Room for ``max_context`` tokens (attention's buffers grow; the graph is captured again)."""
        if max_context <= self.max_context:
            return
        self.layers = [b.mixer.grow_static(buf, max_context) for b, buf in zip(self.model.blocks, self.layers)]
        self.max_context, self.graph = max_context, None

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (``tokens`` [B]); the logits of the next [B, V] (on CUDA a view of the
        graph's output buffer: copy it to keep it past the next step)."""
        if self.longest >= self.max_context:
            raise ValueError(f"the static cache is full: max_context={self.max_context} tokens")
        self.tokens.copy_(tokens.reshape(self.batch))
        self.longest += 1
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _step(self) -> torch.Tensor:
        m = self.model
        x = m.embed(self.tokens[:, None])
        for block, buf in zip(m.blocks, self.layers):
            x = x + block.mixer.decode_step(block.mixer_norm(x), self.position, buf)
            x = x + block.mlp(block.mlp_norm(x))
        self.position += 1
        return m.head(m.norm(x))[:, 0]

    def _capture(self) -> None:
        """Warm up once on a side stream (Triton compiles, tables are built), put the buffers back,
        then capture one step."""
        saved = [{k: t.clone() for k, t in layer.items()} for layer in self.layers] + [self.position.clone()]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for layer, old in zip(self.layers, saved):
            for k, t in layer.items():
                t.copy_(old[k])
        self.position.copy_(saved[-1])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()


def _row_of(cache, r: int):
    """Row ``r`` of a layer's decode cache, as a one-row cache of the same kind."""
    fields = {k: (v[r : r + 1] if isinstance(v, torch.Tensor) else v) for k, v in vars(cache).items()}
    if "state" in fields and fields["state"] is not None:
        fields["state"] = tuple(s[r : r + 1] for s in fields["state"])
    return type(cache)(**fields)
