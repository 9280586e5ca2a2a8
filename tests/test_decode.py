"""Static decoding (bla.model.decode): the StaticDecoder's step against the growing caches on
the CPU (its eager twin shares every line with the captured step), and the captured CUDA graph
against the eager step on a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from bla.eval.generate import generate
from bla.model import BLALM, apply_overrides, load_preset

# every mixer with a static decode step, windows shorter than the prompts, short convolutions
HYBRID = ["layer_pattern=[bla, attn, swa]", "swa_window=8", "bla.window=16", "bla.slots=4", "attn_short_conv=3"]


def _hybrid(*extra: str) -> BLALM:
    torch.manual_seed(0)
    return BLALM(apply_overrides(load_preset("tiny"), HYBRID + list(extra))).eval()


def test_static_decoding_equals_the_cached_path_for_every_mixer():
    """The StaticDecoder's step (the eager twin of the CUDA-graph step: the same code) against
    generation through the growing caches: mixed prompt lengths, greedy and seeded sampling, the
    logits of a step against a full forward, a full static cache refused."""
    from bla.model.decode import StaticDecoder

    model = _hybrid("bla.rope=true", "bla.qk_norm=true")
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (3, 11, 1, 25)]
    assert generate(model, prompts, 20, static=True) == generate(model, prompts, 20, static=False)
    assert generate(model, prompts, 9, temperature=1.0, top_p=0.9, seed=4, static=True) == generate(
        model, prompts, 9, temperature=1.0, top_p=0.9, seed=4, static=False
    )
    equal = torch.randint(3, 256, (2, 6))
    assert torch.equal(generate(model, equal, 5, static=True), generate(model, equal, 5, static=False))
    dec = StaticDecoder(model, len(prompts), 27, graph=False)
    nxt = dec.prefill(prompts).argmax(-1)
    logits = dec.step(nxt)
    with torch.no_grad():
        full = torch.stack([model(torch.tensor([p + [int(t)]])).logits[0, -1] for p, t in zip(prompts, nxt)])
    assert_close("logits", logits, full, atol=1e-5)
    assert dec.nbytes() > 0
    dec.step(logits.argmax(-1))
    with pytest.raises(ValueError, match="static cache is full"):
        dec.step(nxt)
    with pytest.raises(ValueError, match="longer than max_context"):
        StaticDecoder(model, 1, 4, graph=False).prefill([[5] * 6])


@pytest.mark.gpu
def test_captured_decode_step_equals_the_eager_step():
    from bla.model.decode import StaticDecoder

    model = _hybrid().cuda()
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (3, 11, 1, 25)]
    graphed, eager = StaticDecoder(model, 4, 64, graph=True), StaticDecoder(model, 4, 64, graph=False)
    a, b = graphed.prefill(prompts), eager.prefill(prompts)
    for _ in range(12):
        nxt = a.argmax(-1)
        a, b = graphed.step(nxt).clone(), eager.step(nxt)
        assert_close("logits", a, b, atol=1e-4)
    assert graphed.graph is not None


def test_static_buffers_grow_and_load_a_stacked_cache():
    """A decoder loaded from stacked row caches (left-padded keys), grown when attention's buffers
    fill (the Hugging Face path's growth): the same greedy tokens as the growing caches."""
    from bla.model import DecodeCache
    from bla.model.decode import StaticDecoder

    model = _hybrid()
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (3, 11, 1, 25)]
    want = generate(model, prompts, 12, static=False)
    with torch.no_grad():
        outs = [model(torch.tensor([p]), cache=model.new_cache()) for p in prompts]
    dec = StaticDecoder(model, len(prompts), 26, graph=False)
    dec.load(DecodeCache.stack([o.cache for o in outs]))
    nxt = torch.cat([o.logits[:, -1] for o in outs]).argmax(-1)
    got = [nxt]
    for _ in range(11):
        if dec.longest >= dec.max_context:
            dec.grow(dec.max_context + 3)
        nxt = dec.step(nxt).argmax(-1)
        got.append(nxt)
    assert dec.max_context > 26  # it grew
    rows = torch.stack(got, 1).tolist()
    assert [p + r for p, r in zip(prompts, rows)] == want


def _hf_model(device: str):
    from bla.train.hf.configuration_bla import BLALMConfig
    from bla.train.hf.modeling_bla import BLAForCausalLM

    cfg = apply_overrides(load_preset("tiny"), HYBRID)
    torch.manual_seed(0)
    model = BLAForCausalLM(BLALMConfig(bla_model=cfg.to_dict())).to(device).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_hugging_face_generate_on_static_buffers_equals_the_growing_caches(device):
    """The exported model class's generate(): after the prompt, static buffers (a captured graph on
    CUDA, the default there; forced on the CPU), grown past their first size, under a left-padded
    batch and beam search; the same tokens as the growing caches."""
    model = _hf_model(device)
    ids = torch.randint(3, 256, (3, 12), device=device)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: row 0 is 7 tokens long
    mask[2, :11] = 0  # row 2: one token
    results = {}
    for static in (True, False):
        model.static_decoding = static
        with torch.no_grad():
            greedy = model.generate(ids, attention_mask=mask, max_new_tokens=300, min_new_tokens=300, do_sample=False)
            beam = model.generate(ids[:1], max_new_tokens=6, num_beams=3, do_sample=False)
        results[static] = (greedy, beam)
    assert torch.equal(results[True][0], results[False][0])  # 300 > 256 new tokens: attention's buffers grew
    assert torch.equal(results[True][1], results[False][1])
