"""Softmax attention over packed documents and sliding windows through FlexAttention
(bla.model.flex): equal to SDPA with the dense [T, T] mask in float64, alone and inside the
model (the path compiled CUDA blocks take, forced here on the CPU); gradients on a GPU, where
FlexAttention has a backward (on the CPU it has none)."""

from __future__ import annotations

import pytest
import torch

from bla.model import BLALM, apply_overrides, load_preset
from bla.model.flex import masked_attention
from bla.model.mixers import SoftmaxMixer, attention_mask, document_ids, positions_from_cu_seqlens
from helpers import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the CPU's unfused path, meant here

OFFSETS = [0, 30, 31, 120, 200]  # documents of 30, 1, 89 and 80 tokens


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("window", [None, 16])
def test_masked_attention_equals_sdpa_with_the_dense_mask(packed, window):
    _check_against_sdpa(packed, window, "cpu", torch.float64, grads=False, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("window", [None, 16])
def test_on_the_gpu_compiled_masked_attention_and_its_gradients_equal_sdpa(packed, window):
    _check_against_sdpa(packed, window, "cuda", torch.float32, grads=True, atol=2e-5, compiled=True)


def _check_against_sdpa(packed, window, device, dtype, grads: bool, atol: float, compiled: bool = False):
    g = torch.Generator().manual_seed(0)
    T, H, Hkv, d = OFFSETS[-1], 4, 2, 16
    q, k, v = (torch.randn(1 if packed else 2, h, T, d, generator=g, dtype=dtype).to(device).requires_grad_(grads)
               for h in (H, Hkv, Hkv))  # fmt: skip
    if packed:
        cu = torch.tensor(OFFSETS, dtype=torch.int32, device=device)
        doc, pos = document_ids(cu, T, device), positions_from_cu_seqlens(cu, T)
    else:
        doc, pos = torch.zeros(1, T, dtype=torch.long, device=device), torch.arange(T, device=device)[None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(pos, pos, doc, doc, window), enable_gqa=True)
    attend = torch.compile(masked_attention) if compiled else masked_attention
    got = attend(q, k, v, doc[0] if packed else None, window, enable_gqa=True)
    assert_close("output", got, want, atol=atol)
    if grads:
        grad = torch.randn(want.shape, generator=g, dtype=dtype).to(device)
        for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
            assert_close(f"d{name}", a, b, atol=atol)


@pytest.mark.parametrize("pattern", ["[attn]", "[swa]", "[bla, attn]"])
def test_the_model_gives_the_same_loss_through_flex(pattern, monkeypatch):
    cfg = apply_overrides(load_preset("tiny"), [f"layer_pattern={pattern}", "vocab_size=97", "swa_window=8", "bla.window=16",
                                                "bla.slots=4", "bla.backend=torch"])  # fmt: skip
    g = torch.Generator().manual_seed(1)
    T = OFFSETS[-1]
    ids = torch.randint(0, 97, (1, T + 1), generator=g)
    cu = torch.tensor(OFFSETS, dtype=torch.int32)
    positions = positions_from_cu_seqlens(cu, T)

    def logits(flex: bool):
        monkeypatch.setattr(SoftmaxMixer, "use_flex", staticmethod(lambda q: flex))
        torch.manual_seed(0)
        with torch.no_grad():
            return BLALM(cfg).double()(ids[:, :-1], cu_seqlens=cu, positions=positions).logits

    assert_close("logits", logits(True), logits(False), atol=1e-12)


def test_compiled_blocks_trace_flex_whole_and_equal_eager(monkeypatch):
    """The CUDA path's shape on the CPU: blocks compiled whole (fullgraph; aot_eager, as the CPU has
    no fused FlexAttention) take FlexAttention where traced and equal the eager model, for two
    packed layouts (another length and document count: a recompile, not a stale mask)."""
    monkeypatch.setattr(SoftmaxMixer, "use_flex", staticmethod(lambda q: torch.compiler.is_compiling()))
    cfg = apply_overrides(load_preset("tiny"), ["layer_pattern=[attn, swa]", "vocab_size=97", "swa_window=8"])
    torch.manual_seed(0)
    eager = BLALM(cfg).eval()
    compiled = BLALM(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 97, (1, OFFSETS[-1]), generator=torch.Generator().manual_seed(2))
    for offsets in (OFFSETS, [0, 50, 150]):
        cu = torch.tensor(offsets, dtype=torch.int32)
        positions = positions_from_cu_seqlens(cu, offsets[-1])
        x = ids[:, : offsets[-1]]
        with torch.no_grad():
            assert_close("logits", compiled(x, cu_seqlens=cu, positions=positions).logits,
                         eager(x, cu_seqlens=cu, positions=positions).logits, atol=1e-5)  # fmt: skip
