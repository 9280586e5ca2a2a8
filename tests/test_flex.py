"""Softmax attention over packed documents and sliding windows through FlexAttention and flash's
variable-length kernel (bla.model.flex): equal to SDPA with the dense [T, T] mask in float64,
alone and inside the model (the paths CUDA takes, forced here on the CPU: FlexAttention unfused,
and a stand-in for ``varlen_attn``, which has no CPU kernel, to check what the model hands it);
gradients and the real kernels on a GPU."""

from __future__ import annotations

import types

import pytest
import torch

from bla.model import BLALM, apply_overrides, load_preset
from bla.model import flex
from bla.model.flex import masked_attention, varlen_applies, varlen_attention
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


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("torch_kind", ["windowed", "causal_only"])
def test_varlen_attention_hands_flash_the_documents_and_window(packed, window, torch_kind, monkeypatch):
    """What the model gives ``varlen_attn`` (flattened rows, ``cu_seqlens``, flash's left window,
    GQA) computes SDPA's masked attention, through a float64 stand-in with flash's semantics; a
    torch whose varlen_attn knows no window or GQA gets the window refused and kv heads repeated."""
    _stand_in_varlen(monkeypatch, windowed=torch_kind == "windowed")
    if torch_kind == "causal_only" and window is not None:
        cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
        assert not varlen_applies(cuda_like, window) and varlen_applies(cuda_like, None)
        return
    _check_against_sdpa(packed, window, "cpu", torch.float64, grads=False, atol=1e-12, varlen=True)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("compiled", [False, True])
def test_on_the_gpu_varlen_attention_and_its_gradients_equal_sdpa(packed, window, compiled):
    flex.load_varlen()  # as building a softmax layer does
    q = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    if not varlen_applies(q, window):
        pytest.skip("this torch's varlen_attn does not take this case")
    _check_against_sdpa(packed, window, "cuda", torch.bfloat16, grads=True, atol=3e-2, compiled=compiled, varlen=True)


def _stand_in_varlen(monkeypatch, windowed: bool = True):
    """``bla.model.flex.varlen`` replaced by a float64 loop over documents with flash's semantics:
    query i of a document reads its keys j with ``i - left <= j <= i + right``; like flash, it needs
    only the head dimension contiguous."""

    def attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, -1), enable_gqa=False, is_causal=False):
        assert query.stride(-1) == key.stride(-1) == 1 and cu_seq_q.dtype == torch.int32 and max_q == max_k >= int(cu_seq_q.diff().max())
        left, right = (-1, 0) if is_causal else window_size
        out = torch.zeros_like(query)
        for a, b in zip(cu_seq_q.tolist()[:-1], cu_seq_q.tolist()[1:]):
            i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
            allowed = ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
            q, k, v = (x[a:b].transpose(0, 1) for x in (query, key, value))
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=enable_gqa).transpose(0, 1)
        return out

    if windowed:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, enable_gqa)
    else:  # an older signature: causal only, no GQA
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)

    stand_in = types.SimpleNamespace(varlen_attn=varlen_attn)
    monkeypatch.setattr(flex, "varlen", stand_in)
    monkeypatch.setattr(flex, "VARLEN_KEYWORDS", flex.varlen_keywords(stand_in))
    monkeypatch.setattr(flex, "_varlen_loaded", True)  # building a model keeps the stand-in


def _check_against_sdpa(packed, window, device, dtype, grads: bool, atol: float, compiled: bool = False, varlen: bool = False):
    g = torch.Generator().manual_seed(0)
    T, H, Hkv, d = OFFSETS[-1], 4, 2, 16
    q, k, v = (torch.randn(1 if packed else 2, h, T, d, generator=g, dtype=dtype).to(device).requires_grad_(grads)
               for h in (H, Hkv, Hkv))  # fmt: skip
    if packed:
        cu = torch.tensor(OFFSETS, dtype=torch.int32, device=device)
        doc, pos = document_ids(cu, T, device), positions_from_cu_seqlens(cu, T)
    else:
        doc, pos = torch.zeros(1, T, dtype=torch.long, device=device), torch.arange(T, device=device)[None]
    mask = attention_mask(pos, pos, doc, doc, window)
    up = torch.promote_types(dtype, torch.float32)  # half precision: against float32
    want = torch.nn.functional.scaled_dot_product_attention(q.to(up), k.to(up), v.to(up), attn_mask=mask, enable_gqa=True)
    attend = varlen_attention if varlen else masked_attention
    attend = torch.compile(attend) if compiled else attend
    got = attend(q, k, v, (cu if varlen else doc[0]) if packed else None, window, enable_gqa=True)
    assert_close("output", got.to(want.dtype), want, atol=atol)
    if grads:
        grad = torch.randn(want.shape, generator=g, dtype=dtype).to(device)
        for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), grad.to(got.dtype)), torch.autograd.grad(want, (q, k, v), grad.to(up))):
            assert_close(f"d{name}", a, b, atol=atol)


@pytest.mark.parametrize("pattern", ["[attn]", "[swa]", "[bla, attn]"])
@pytest.mark.parametrize("kernel", ["flex", "varlen"])
def test_the_model_gives_the_same_logits_through_flex_and_varlen(pattern, kernel, monkeypatch):
    cfg = apply_overrides(load_preset("tiny"), [f"layer_pattern={pattern}", "vocab_size=97", "swa_window=8", "bla.window=16",
                                                "bla.slots=4", "bla.backend=torch"])  # fmt: skip
    g = torch.Generator().manual_seed(1)
    T = OFFSETS[-1]
    ids = torch.randint(0, 97, (1, T + 1), generator=g)
    cu = torch.tensor(OFFSETS, dtype=torch.int32)
    positions = positions_from_cu_seqlens(cu, T)

    if kernel == "varlen":
        _stand_in_varlen(monkeypatch)

    def logits(sparse: bool):  # the sparse kernel, or SDPA with the dense mask
        monkeypatch.setattr(SoftmaxMixer, "use_flex", staticmethod(lambda q: sparse and kernel == "flex"))
        monkeypatch.setattr(SoftmaxMixer, "use_varlen", staticmethod(lambda q, window: sparse and kernel == "varlen"))
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
