"""Causality and document isolation of the whole model: in a packed row (cu_seqlens padded with
empty documents, as the LM batches are) a changed token may change the outputs at its own
position and its document's later positions, nowhere else. Checked on every mixer kind in
float64 on the CPU and, on a GPU, with the Triton kernels compiled (and replayed as CUDA graphs)
in bf16: a leak of future or foreign tokens would let a model "learn" random text."""

from __future__ import annotations

import pytest
import torch

from bla.data.packing import pad_cu_seqlens
from bla.model import BLALM, apply_overrides, load_preset
from bla.model.mixers import positions_from_cu_seqlens

VOCAB = 97


def _packed(lengths: list[int], rows: int = 1) -> dict:
    """One packed row of documents of these lengths, repeated ``rows`` times end to end."""
    g = torch.Generator().manual_seed(0)
    lengths = lengths * rows
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = positions_from_cu_seqlens(cu, int(cu[-1]))
    ids = torch.randint(0, VOCAB, (1, int(cu[-1])), generator=g)
    return {"ids": ids, "positions": positions, "cu": cu}


def _influence(model, batch: dict, probes: list[int], device) -> list[tuple[int, list[int]]]:
    """For each probe token: the positions whose logits change when it changes."""
    cu = pad_cu_seqlens(batch["cu"]).to(device)
    ids, positions = batch["ids"].to(device), batch["positions"].to(device)

    def logits(x):
        torch.compiler.cudagraph_mark_step_begin()  # under CUDA graphs: a new step (no-op otherwise)
        with torch.no_grad():
            return model(x, cu_seqlens=cu, positions=positions).logits.float().clone()

    base = logits(ids)
    scale = base.abs().amax().item()
    out = []
    for t in probes:
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % VOCAB
        diff = (logits(changed) - base).abs().amax(-1)[0]
        out.append((t, (diff > 1e-6 * scale).nonzero().flatten().tolist()))
    return out


def _assert_isolated(influence, cu: torch.Tensor) -> None:
    offsets = cu.tolist()
    for t, changed in influence:
        start = max(i for i, c in enumerate(offsets[:-1]) if c <= t)
        end = offsets[start + 1]
        outside = [p for p in changed if not t <= p < end]
        assert not outside, f"token {t} (document [{offsets[start]}, {end})) changed positions {outside[:8]} outside [{t}, {end})"
        assert t in changed, f"token {t} changed nothing, not even its own position: the probe is blind"


MIXERS = {
    "bla": ["layer_pattern=[bla]", "bla.backend=torch"],
    "bla_steered": ["layer_pattern=[bla]", "bla.backend=torch", "bla.write_gate=true", "bla.forget_gate=true",
                    "bla.phase_shift=staggered"],
    "attn": ["layer_pattern=[attn]"],
    "swa": ["layer_pattern=[swa]", "swa_window=8"],
    "gsa": ["layer_pattern=[gsa]"],
    "hybrid": ["layer_pattern=[bla, attn]", "bla.backend=torch"],
}  # fmt: skip


def _model(overrides: list[str], **extra) -> BLALM:
    cfg = apply_overrides(load_preset("tiny"), [f"vocab_size={VOCAB}", "bla.window=16", "bla.slots=4", *overrides,
                                                *(f"{k}={v}" for k, v in extra.items())])  # fmt: skip
    torch.manual_seed(0)
    return BLALM(cfg)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_a_token_reaches_only_its_documents_later_positions(mixer):
    batch = _packed([7, 30, 1, 20, 13])  # 71 tokens: documents shorter and longer than the window, one of 1 token
    model = _model(MIXERS[mixer]).double()
    probes = [0, 5, 6, 7, 20, 36, 37, 38, 50, 57, 58, 70]
    _assert_isolated(_influence(model, batch, probes, "cpu"), batch["cu"])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "compiled", "cuda_graphs"])
@pytest.mark.parametrize("mixer", ["bla", "attn"])
def test_on_the_gpu_the_compiled_kernels_keep_tokens_in_their_documents(mixer, mode):
    """The benchmark's packed rows at a small width: 4 rows of 2048 tokens, documents around 512."""
    lengths = [300, 900, 2, 513, 333]
    batch = _packed(lengths + [2048 - sum(lengths)], rows=4)
    model = _model([f"layer_pattern=[{mixer}]", "bla.backend=auto"], **{"bla.window": 512, "bla.slots": 64})
    model = model.cuda().to(torch.bfloat16).eval()
    if mode != "eager":
        model.compile_blocks(**({"mode": "reduce-overhead"} if mode == "cuda_graphs" else {}))
    probes = [0, 299, 300, 1199, 1200, 1201, 1202, 1714, 2047, 2048, 2048 + 1500, 8191]
    _assert_isolated(_influence(model, batch, probes, "cuda"), batch["cu"])
