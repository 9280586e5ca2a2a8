"""The LM: hybrid layer patterns, decoding caches, packing, config handling and accounting."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from bla.model import BLALM, ModelConfig, apply_overrides, load_preset, param_count, preset_names, state_size
from bla.model.stats import flops_per_token


def tiny(**over) -> ModelConfig:
    return apply_overrides(load_preset("tiny"), [f"{k}={v}" for k, v in over.items()])


def test_tiny_hybrid_overfits_one_batch():
    torch.manual_seed(0)
    model = BLALM(tiny())
    assert [b.kind for b in model.blocks] == ["bla", "attn", "swa"]
    ids = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(120):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.2, (first, loss.item())


@pytest.mark.parametrize("over", [{}, {"bla.short_conv": 0, "attn_short_conv": 0, "bla.output_gate": False}])
def test_fused_input_projections_equal_one_matmul_a_module(over):
    """The compiled path's one matmul over the stacked weights computes each layer's q, k, v and
    output gate as the eager path's one call a module does (float64, outputs and gradients)."""
    from bla.model.mixers import input_projections

    torch.manual_seed(0)
    model = BLALM(tiny(**over)).double()
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    for block in model.blocks:
        mixer = block.mixer
        outs = {}
        for fused in (False, True):
            mixer.zero_grad()
            parts = input_projections(mixer, x, fused=fused)
            sum((p * torch.linspace(-1, 1, p.shape[-1], dtype=p.dtype)).sum() for p in parts).backward()
            outs[fused] = parts + [p.grad.clone() for p in mixer.parameters() if p.grad is not None]
        assert len(outs[True]) == len(outs[False]) == 2 * (3 + (block.kind == "bla" and mixer.gate_proj is not None))
        for i, (a, b) in enumerate(zip(outs[True], outs[False])):
            assert_close(f"{block.kind} part {i}", a, b, atol=1e-12)


@pytest.mark.parametrize("pattern", ["[bla, attn, swa]", "[bla]", "[swa, bla]", "[gsa, attn]"])
@pytest.mark.parametrize("prefill", [1, 13])
def test_generation_logits_equal_parallel(pattern, prefill):
    torch.manual_seed(0)
    model = BLALM(tiny(layer_pattern=pattern, **{"bla.rope": "true"})).eval()
    ids = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prefill], cache=model.new_cache())
        logits, cache = [out.logits], out.cache
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache)
            logits.append(out.logits)
            cache = out.cache
    assert cache.length == ids.shape[1]
    assert_close("logits", torch.cat(logits, 1), full, atol=1e-5)


@pytest.mark.parametrize("gates", ["fejer", "dirichlet_v1", "dirichlet+qk_norm"])  # the default is covered above
def test_generation_logits_equal_parallel_for_every_gate_rule(gates):
    torch.manual_seed(0)
    over = {"bla.gates": gates.split("+")[0], **({"bla.qk_norm": "true"} if "qk_norm" in gates else {})}
    model = BLALM(tiny(layer_pattern="[bla]", **over)).eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], cache=model.new_cache())
        logits, cache = [out.logits], out.cache
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache)
            logits.append(out.logits)
            cache = out.cache
    assert_close("logits", torch.cat(logits, 1), full, atol=1e-5)


def test_bla_decode_cache_is_constant_size():
    model = BLALM(tiny(layer_pattern="[bla]")).eval()
    cache = model.new_cache()
    sizes = []
    with torch.no_grad():
        for t in range(40):
            cache = model(torch.tensor([[t % 256]]), cache=cache).cache
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1


@pytest.mark.parametrize("pattern", ["[bla, attn, swa]", "[gsa, swa]"])
def test_packed_documents_equal_separate_runs(pattern):
    torch.manual_seed(0)
    model = BLALM(tiny(layer_pattern=pattern)).eval()
    ids = torch.randint(0, 256, (1, 50))
    cu = torch.tensor([0, 7, 7, 8, 50])  # includes an empty and a 1-token document
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu).logits
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if b > a:
                assert_close(f"doc {a}:{b}", packed[:, a:b], model(ids[:, a:b]).logits, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cu_seqlens_padded_to_a_capacity_equal_the_unpadded(backend):
    """Packed-document metadata padded to a fixed capacity with empty trailing documents (what a
    replayed CUDA graph needs: static shapes) gives the unpadded loss and gradients, in float64."""
    from bla.data.packing import pad_cu_seqlens
    from bla.kernels import triton_available

    if backend == "triton" and not triton_available(torch.device("cpu")):
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    model = BLALM(tiny(layer_pattern="[bla, attn, swa]", **{"bla.backend": backend})).double()
    ids = torch.randint(0, 256, (1, 41))
    cu = torch.tensor([0, 9, 10, 40])
    padded = pad_cu_seqlens(cu)  # 8 offsets: 4 empty documents appended
    assert padded.tolist() == [0, 9, 10, 40, 40, 40, 40, 40]
    assert pad_cu_seqlens(torch.arange(9)).numel() == 16 and pad_cu_seqlens(torch.arange(16)).numel() == 16
    results = []
    for c in (cu, padded):
        model.zero_grad()
        loss = model(ids[:, :-1], cu_seqlens=c, targets=ids[:, 1:]).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (loss_p, grads_p) = results
    assert_close("loss", loss_p, loss, atol=1e-12)
    for i, (a, b) in enumerate(zip(grads_p, grads)):
        assert_close(f"grad {i}", a, b, atol=1e-12)


def test_the_trainers_static_shapes_pad_the_offsets_and_keep_the_loss():
    """With cuda_graphs the trainer pads each packed batch's offsets (a few shapes to record, not one
    per number of documents); the loss is the unpadded one."""
    from bla.train.trainer import forward_loss

    torch.manual_seed(0)
    model = BLALM(tiny(layer_pattern="[bla, attn]")).double()
    ids = torch.randint(0, 256, (1, 41))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "cu_seqlens": torch.tensor([0, 9, 10, 40], dtype=torch.int32)}
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["cu_seqlens"].tolist()), with_kwargs=True)
    plain = forward_loss(model, batch, "cpu", loss_chunk=16)[0]
    static = forward_loss(model, batch, "cpu", loss_chunk=16, static_shapes=True)[0]
    assert seen == [[0, 9, 10, 40], [0, 9, 10, 40, 40, 40, 40, 40]]
    assert_close("loss", static, plain, atol=1e-12)


def test_labels_are_refused_for_shifted_targets():
    """Hugging Face's `labels=input_ids` (unshifted) would train on the wrong targets here."""
    model = BLALM(tiny())
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(TypeError, match=r"targets=ids\[:, 1:\]"):
        model(ids, labels=ids)


def test_loss_ignores_masked_labels():
    model = BLALM(tiny())
    ids = torch.randint(0, 256, (2, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    loss = model(ids, targets=labels).loss
    manual = torch.nn.functional.cross_entropy(model(ids).logits[:, 5:].reshape(-1, 256), ids[:, 5:].reshape(-1))
    assert_close("loss", loss, manual, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_loss_through_the_head_in_chunks_equals_the_plain_loss(tied):
    """Value and every gradient in float64, with masked labels, a tied or untied head, and chunks
    that do not divide the tokens; no logits are returned."""
    torch.manual_seed(0)
    model = BLALM(apply_overrides(tiny(), [f"tie_embeddings={str(tied).lower()}"])).double()
    ids = torch.randint(3, 256, (2, 37))
    labels = ids.clone()
    labels[0, :9] = -100
    plain = model(ids, targets=labels)
    plain.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(ids, targets=labels, loss_chunk=10)
    chunked.loss.backward()
    assert chunked.logits is None
    assert_close("loss", chunked.loss, plain.loss, atol=1e-12)
    for name, p in model.named_parameters():
        assert_close(name, p.grad, expected[name], atol=1e-12)
    with torch.no_grad():  # no gradients asked: none computed, the same value
        assert_close("no-grad loss", model(ids, targets=labels, loss_chunk=10).loss, plain.loss, atol=1e-12)


def test_linear_cross_entropy_in_half_precision_and_bad_shapes():
    from bla.model.loss import linear_cross_entropy

    h = torch.randn(12, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(20, 8, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 20, (12,))
    loss = linear_cross_entropy(h, w, y, chunk=5)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    reference = torch.nn.functional.cross_entropy((h.detach() @ w.detach().t()).float(), y)
    assert abs(float(loss.detach()) - float(reference)) < 1e-5
    with pytest.raises(ValueError, match=r"expected hidden \[N, D\], weight \[V, D\], labels \[N\]"):
        linear_cross_entropy(h, w.t(), y)


def test_config_yaml_round_trip(tmp_path):
    for name in preset_names():
        cfg = load_preset(name)
        path = tmp_path / f"{name}.yaml"
        cfg.to_yaml(path)
        assert ModelConfig.from_yaml(path) == cfg
    cfg = apply_overrides(load_preset("tiny"), ["bla.window=[8, 16]", "layer_pattern=bla,swa"])
    assert cfg.bla.window == [8, 16] and cfg.layer_pattern == ["bla", "swa"]


@pytest.mark.parametrize(
    "over,match",
    [
        (["layer_pattern=[bla, mamba]"], "unknown mixer 'mamba'"),
        (["bla.slots=5"], "bla.slots=5 must divide every bla.window"),
        (["n_heads=3"], "n_heads=3 must divide d_model=64"),
        (["n_kv_heads=3"], "n_kv_heads=3 must divide n_heads=4"),
        (["bla.window=[16, 16, 16]"], "one per kv head"),
        (["d_modl=3"], "unknown key"),
        (["bla.backend=cuda"], "bla.backend must be"),
    ],
)
def test_bad_config_is_refused(over, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(load_preset("tiny"), over)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        load_preset("huge")


@pytest.mark.parametrize("name", ["tiny", "125m", "350m", "1.3b", "tiny+gsa", "tiny+qk_norm"])
def test_param_count_matches_built_model(name):
    special = {"tiny+gsa": {"layer_pattern": "[gsa, attn]"}, "tiny+qk_norm": {"layer_pattern": "[bla, gsa]", "bla.qk_norm": "true"}}
    cfg = load_preset(name) if name not in special else tiny(**special[name])
    with torch.device("meta"):
        model = BLALM(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)


def test_preset_sizes_are_as_named():
    expected = {"125m": 125e6, "350m": 350e6, "1.3b": 1.3e9}
    for name, n in expected.items():
        assert 0.8 * n < param_count(load_preset(name)) < 1.2 * n, name


def test_state_size_and_flops():
    cfg = tiny()  # layers: bla (m=4), attn, swa (W=16); 2 kv heads of 16
    T = 100
    expected = 2 * 4 * 32 + 2 * T * 32 + 2 * 16 * 32
    assert state_size(cfg, T, bytes_per_element=2) == {"elements": expected, "bytes": 2 * expected}
    bla_only = tiny(layer_pattern="[bla]")
    assert state_size(bla_only, 10) == state_size(bla_only, 10**6)  # constant in context
    n = param_count(bla_only)
    assert flops_per_token(bla_only, 10) == 6 * n + 3 * 3 * 4 * 4 * 4 * 32


# ---------------------------------------------------------------- gates and saved configs


def deterministic_weights(model: BLALM) -> BLALM:
    """Weights that depend on nothing but their names' order and shapes (no RNG, any torch)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            n = torch.arange(p.numel(), dtype=torch.float64)
            is_norm = ".weight" in name and "norm" in name
            p.copy_((0.05 * torch.sin(0.37 * n + i)).view_as(p) + (1.0 if is_norm else 0.0))
    return model


def legacy_loss(cfg: ModelConfig) -> float:
    model = deterministic_weights(BLALM(cfg).double())
    ids = (torch.arange(200) * 37 % 253 + 3)[None]
    with torch.no_grad():
        return model(ids[:, :-1], targets=ids[:, 1:]).loss.item()


def test_a_saved_config_without_gates_computes_what_it_was_trained_with():
    """tests/data/legacy_v1_loss.json was computed by the code before bla.gates existed (spec v1);
    its saved config (no gates key) loads as dirichlet_v1 and gives that loss again."""
    import json
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "data" / "legacy_v1_loss.json").read_text())
    assert "gates" not in golden["config"]["bla"]
    cfg = ModelConfig.from_saved(golden["config"])
    assert cfg.bla.gates == "dirichlet_v1"
    assert legacy_loss(cfg) == pytest.approx(golden["loss"], rel=1e-12)
    v2 = legacy_loss(ModelConfig.from_dict(golden["config"]))  # a new config: the model's default
    assert ModelConfig.from_dict(golden["config"]).bla.gates == "fejer"
    assert abs(v2 - golden["loss"]) > 1e-4


def test_gates_in_config_validation_and_round_trip():
    cfg = tiny(**{"bla.gates": "fejer"})
    assert cfg.bla.gates == "fejer"
    assert ModelConfig.from_saved(cfg.to_dict()).bla.gates == "fejer"  # a saved key is kept
    with pytest.raises(ValueError, match=r"bla.gates must be one of \('dirichlet', 'fejer', 'dirichlet_v1'\)"):
        tiny(**{"bla.gates": "sinc"})
