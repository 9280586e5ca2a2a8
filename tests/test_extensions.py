"""Spec section 6: the selective write (beta), scalar forgetting (log_gamma) and staggered heads
(phase_shift), against the float64 recurrence with the new gates; off means plain BLA bit for bit."""

from __future__ import annotations

import pytest
import torch

from bla.kernels import bla_attention, bla_step
from bla.model import BLALM, apply_overrides, load_preset
from helpers import assert_close, random_qkv, random_state

W, M = 16, 4  # stride r = 4: shifts 0..3


def _gates(B, T, G, seed=3, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    beta = torch.rand(B, T, G, generator=g, dtype=torch.float64)
    log_gamma = -0.3 * torch.rand(B, T, G, generator=g, dtype=torch.float64)
    return beta.requires_grad_(requires_grad), log_gamma.requires_grad_(requires_grad)


# each extension alone and all together, under GQA, both v2 gate rules
EXTENSIONS = {"write": ("beta",), "forget": ("log_gamma",), "shift": ("phase_shift",), "all": ("beta", "log_gamma", "phase_shift")}


def _kwargs(which, beta, log_gamma, shift=(1, 3)):
    given = {"beta": beta, "log_gamma": log_gamma, "phase_shift": list(shift)}
    return {name: given[name] for name in EXTENSIONS[which]}


@pytest.mark.parametrize("gates", ["dirichlet", "fejer"])
@pytest.mark.parametrize("which", list(EXTENSIONS))
def test_torch_backend_equals_the_recurrence_with_gradients(which, gates):
    q, k, v = random_qkv(2, 45, 4, 2, 8, 6, requires_grad=True)
    beta, log_gamma = _gates(2, 45, 2, requires_grad=True)
    state = random_state(2, 2, M, 8, 6, requires_grad=True)
    inputs = [q, k, v, beta, log_gamma, *state]
    results = {}
    for backend in ("reference", "torch"):
        o, (K, V) = bla_attention(q, k, v, W, M, initial_state=state, output_final_state=True, offset=5, backend=backend,
                                  gates=gates, **_kwargs(which, beta, log_gamma))  # fmt: skip
        loss = o.square().sum() + K.sum() + (V * V).sum()
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        results[backend] = (o, K, V, grads)
    ref, got = results["reference"], results["torch"]
    for name, a, b in zip(("o", "K", "V"), got[:3], ref[:3]):
        assert_close(name, a, b, atol=1e-11)
    names = ("dq", "dk", "dv", "dbeta", "dlog_gamma", "dK0", "dV0")
    for name, a, b in zip(names, got[3], ref[3]):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(name, a, b, atol=1e-10)
    used = set(EXTENSIONS[which])
    assert (got[3][3] is not None) == ("beta" in used) and (got[3][4] is not None) == ("log_gamma" in used)


def test_packed_documents_each_start_fresh_with_their_own_gates():
    q, k, v = random_qkv(1, 50, 2, 2, 8, 8)
    beta, log_gamma = _gates(1, 50, 2)
    cu = torch.tensor([0, 7, 30, 50])
    kw = {"beta": beta, "log_gamma": log_gamma, "phase_shift": 2}
    o, (K, V) = bla_attention(q, k, v, W, M, cu_seqlens=cu, output_final_state=True, backend="torch", gates="fejer", **kw)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {"beta": beta[:, a:b], "log_gamma": log_gamma[:, a:b], "phase_shift": 2}
        o_n, (K_n, V_n) = bla_attention(q[:, a:b], k[:, a:b], v[:, a:b], W, M, output_final_state=True, backend="reference",
                                        gates="fejer", **part)  # fmt: skip
        assert_close(f"o doc {n}", o[:, a:b], o_n, atol=1e-11)
        assert_close(f"K doc {n}", K[n : n + 1], K_n, atol=1e-11)


def test_off_is_plain_bla_bit_for_bit_and_neutral_values_equal_it():
    q, k, v = random_qkv(2, 40, 4, 2, 8, 8)
    for backend in ("reference", "torch"):
        plain, (K, _) = bla_attention(q, k, v, W, M, output_final_state=True, backend=backend, gates="fejer")
        off, (K_off, _) = bla_attention(q, k, v, W, M, output_final_state=True, backend=backend, gates="fejer",
                                        beta=None, log_gamma=None, phase_shift=0)  # fmt: skip
        assert torch.equal(plain, off) and torch.equal(K, K_off)
        ones, zeros = torch.ones(2, 40, 2, dtype=torch.float64), torch.zeros(2, 40, 2, dtype=torch.float64)
        neutral, (K_n, _) = bla_attention(q, k, v, W, M, output_final_state=True, backend=backend, gates="fejer",
                                          beta=ones, log_gamma=zeros, phase_shift=[0, 0])  # fmt: skip
        if backend == "reference":  # s = 1 * s, alpha = 1 - 1 * e, exp(0) * alpha: exact
            assert torch.equal(neutral, plain) and torch.equal(K_n, K)
        else:  # per-row tables from data: the same values, summed in another order
            assert_close("neutral o", neutral, plain, atol=1e-13)


def test_a_zero_write_skips_the_token_and_partial_writes_outlast_the_window():
    q, k, v = random_qkv(1, 3 * W, 2, 2, 8, 8)
    state = random_state(1, 2, M, 8, 8)
    beta = torch.zeros(1, 3 * W, 2, dtype=torch.float64)
    _, (K, V) = bla_attention(q, k, v, W, M, initial_state=state, output_final_state=True, backend="torch", beta=beta)
    assert torch.equal(K, state[0]) and torch.equal(V, state[1])  # nothing written, nothing erased
    # full writes (beta = 1): token 0 is gone W positions later; partial ones keep it (memory past W)
    for b, outlasts in ((1.0, False), (0.5, True)):
        beta = torch.full((1, 3 * W, 2), b, dtype=torch.float64)
        o = bla_attention(q, k, v, W, M, backend="reference", beta=beta)[0]
        k2 = k.clone()
        k2[:, 0] += 1.0
        o2 = bla_attention(q, k2, v, W, M, backend="reference", beta=beta)[0]
        assert bool((o2[:, W:] - o[:, W:]).abs().max() > 1e-12) == outlasts


def test_a_phase_shift_is_the_phase_of_a_later_start():
    """theta_j + s: token t sits where token t + W - s would in plain BLA (one head, from zeros)."""
    q, k, v = random_qkv(1, 40, 1, 1, 8, 8)
    for shift in range(1, W // M):
        shifted = bla_attention(q, k, v, W, M, backend="torch", phase_shift=shift)[0]
        later = bla_attention(q, k, v, W, M, backend="reference", offset=W - shift)[0]
        assert_close(f"shift {shift}", shifted, later, atol=1e-12)


@pytest.mark.parametrize("gates", ["dirichlet", "fejer"])
def test_decode_steps_and_split_sequences_equal_the_parallel_form(gates):
    T = 37
    q, k, v = random_qkv(2, T, 4, 2, 8, 8)
    beta, log_gamma = _gates(2, T, 2)
    kw = {"gates": gates, "phase_shift": [3, 1]}
    o, final = bla_attention(q, k, v, W, M, output_final_state=True, backend="torch", beta=beta, log_gamma=log_gamma, **kw)
    state, outs = None, []
    for t in range(T):
        o_t, state = bla_step(q[:, t], k[:, t], v[:, t], state, torch.full((2,), t), W, M, beta=beta[:, t],
                              log_gamma=log_gamma[:, t], **kw)  # fmt: skip
        outs.append(o_t)
    assert_close("steps", torch.stack(outs, 1), o, atol=1e-11)
    assert_close("step state", state[0], final[0], atol=1e-11)
    cut = 19
    _, mid = bla_attention(q[:, :cut], k[:, :cut], v[:, :cut], W, M, output_final_state=True, backend="torch",
                           beta=beta[:, :cut], log_gamma=log_gamma[:, :cut], **kw)  # fmt: skip
    rest, _ = bla_attention(q[:, cut:], k[:, cut:], v[:, cut:], W, M, initial_state=mid, offset=cut, backend="torch",
                            beta=beta[:, cut:], log_gamma=log_gamma[:, cut:], **kw)  # fmt: skip
    assert_close("carried", rest, o[:, cut:], atol=1e-11)


def test_bad_extension_inputs_are_refused_by_name():
    q, k, v = random_qkv(1, 8, 2, 2, 4, 4)
    ones = torch.ones(1, 8, 2, dtype=torch.float64)
    cases = [
        ({"beta": torch.ones(1, 8, 4, dtype=torch.float64)}, r"beta must have shape \[B, T, H_kv\] = \[1, 8, 2\]"),
        ({"beta": 1.5 * ones}, r"beta must lie in \[0, 1\]"),
        ({"log_gamma": 0.1 * ones}, "log_gamma must be finite and <= 0"),
        ({"log_gamma": torch.ones(1, 8, 2, dtype=torch.int64)}, "log_gamma must be a floating-point tensor"),
        ({"phase_shift": 4}, r"phase_shift of kv head 0 must lie in \[0, W/m = 4\)"),
        ({"phase_shift": [1, 2, 3]}, r"one int per kv head \(2\)"),
        ({"beta": ones, "gates": "dirichlet_v1"}, "v2 gates"),
        ({"beta": ones, "backend": "triton"}, "backend='triton' does not implement beta or log_gamma"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            bla_attention(q, k, v, W, M, **kw)


def test_the_model_options_train_decode_and_load_without_them():
    cfg = apply_overrides(load_preset("tiny"), ["bla.write_gate=true", "bla.forget_gate=true", "bla.phase_shift=staggered"])
    torch.manual_seed(0)
    model = BLALM(cfg).double()
    mixer = model.blocks[0].mixer
    assert mixer.shifts == [0, 2] and mixer.beta_proj is not None and mixer.gamma_proj is not None
    from bla.model.stats import param_count

    assert param_count(cfg) == sum(p.numel() for p in model.parameters())  # the projections counted
    ids = torch.randint(3, 256, (2, 30))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    assert mixer.beta_proj.weight.grad.abs().sum() > 0 and mixer.gamma_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # prefill then one token at a time == the whole sequence
        whole = model(ids).logits
        cache = model.new_cache()
        first = model(ids[:, :11], cache=cache)
        steps, cache = [first.logits], first.cache
        for t in range(11, 30):
            step = model(ids[:, t : t + 1], cache=cache)
            steps.append(step.logits)
            cache = step.cache
    assert_close("decode", torch.cat(steps, 1), whole, atol=1e-10)
    from bla.model.config import ModelConfig

    saved = {key: value for key, value in vars(load_preset("tiny")).items()}
    saved["bla"] = {key: value for key, value in vars(load_preset("tiny").bla).items()
                    if key not in ("write_gate", "forget_gate", "phase_shift")}  # fmt: skip
    old = ModelConfig.from_saved(saved)  # a config from before the options: off
    assert (old.bla.write_gate, old.bla.forget_gate, old.bla.phase_shift) == (False, False, "off")
    with pytest.raises(ValueError, match="bla.phase_shift must be one of"):
        apply_overrides(load_preset("tiny"), ["bla.phase_shift=sideways"]).validate()
    with pytest.raises(ValueError, match="gsa layers learn their own decay"):
        apply_overrides(load_preset("tiny"), ["layer_pattern=[gsa]", "bla.write_gate=true"]).validate()


@pytest.mark.parametrize("gates", ["dirichlet", "fejer"])
def test_the_gates_follow_the_spec_formulas(gates):
    """s and alpha from D(p - theta_j - shift_h) written out as in spec sections 1 and 6."""
    import math

    from bla.kernels.gates import dirichlet_gates

    W_, m, T = 24, 6, 60  # r = 4; m even: D = sin(pi m x / W) / (m tan(pi x / W))
    shift = torch.tensor([0, 3])
    beta, log_gamma = _gates(1, T, 2)
    s, alpha, _ = dirichlet_gates(torch.arange(T), torch.tensor([W_, W_]), m, gates=gates, shift=shift,
                                  beta=beta[0], log_gamma=log_gamma[0])  # fmt: skip
    for t in range(T):
        for h in range(2):
            for j in range(m):
                x = (t - j * (W_ // m) - int(shift[h])) % W_
                d = 1.0 if x == 0 else math.sin(math.pi * m * x / W_) / (m * math.tan(math.pi * x / W_))
                b, g = float(beta[0, t, h]), math.exp(float(log_gamma[0, t, h]))
                want_s = b * d if gates == "dirichlet" else b * d * d
                assert s[t, h, j].item() == pytest.approx(want_s, abs=1e-12)
                assert alpha[t, h, j].item() == pytest.approx(g * (1 - b * d * d), abs=1e-12)


def test_float32_inputs_hold_the_float64_recurrence():
    """The torch backend builds float32 tables from data-dependent gates for float32 inputs."""
    q, k, v = random_qkv(2, 70, 4, 2, 16, 16)
    beta, log_gamma = _gates(2, 70, 2)
    kw = {"beta": beta, "log_gamma": log_gamma, "phase_shift": [0, 2], "gates": "fejer"}
    want = bla_attention(q, k, v, W, M, backend="reference", **kw)[0]
    f32 = {name: x.float() if isinstance(x, torch.Tensor) else x for name, x in kw.items()}
    got = bla_attention(q.float(), k.float(), v.float(), W, M, backend="torch", **f32)[0]
    assert got.dtype == torch.float32
    assert_close("o", got, want, atol=2e-5, rtol=1e-5)
