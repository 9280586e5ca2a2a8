"""GSA with learned gates (the sweeps' linear baseline): the chunked kernel against its
recurrent reference, in float64, forward and gradients, fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_qkv, random_state

from bla.kernels import gsa_chunked, gsa_recurrent


def _decay(B, T, Hkv, m, seed, strength=3.0):
    g = torch.Generator().manual_seed(seed)
    return (F.logsigmoid(torch.randn(B, T, Hkv, m, generator=g, dtype=torch.float64) * strength) / 2).requires_grad_()


@pytest.mark.parametrize("T, chunk", [(1, 16), (16, 16), (37, 16), (50, 8)])
@pytest.mark.parametrize("H, Hkv", [(2, 2), (4, 2)])
def test_chunked_equals_recurrent_with_gradients(T, chunk, H, Hkv):
    seed = T * 10 + H
    q, k, v = random_qkv(2, T, H, Hkv, 8, 6, seed=seed, requires_grad=True)
    g = _decay(2, T, Hkv, 5, seed)
    state = random_state(2, Hkv, 5, 8, 6, seed=seed + 1, requires_grad=True)
    o_ref, (K_ref, V_ref) = gsa_recurrent(q, k, v, g, initial_state=state)
    o, (K, V) = gsa_chunked(q, k, v, g, initial_state=state, chunk=chunk)
    for name, a, b in (("o", o, o_ref), ("K", K, K_ref), ("V", V, V_ref)):
        assert_close(name, a, b, atol=1e-12)
    w = torch.randn_like(o)
    inputs = (q, k, v, g, *state)
    grads = torch.autograd.grad((o * w).sum() + K.sum() + V.sum(), inputs)
    grads_ref = torch.autograd.grad((o_ref * w).sum() + K_ref.sum() + V_ref.sum(), inputs)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dK0", "dV0"), grads, grads_ref):
        assert_close(name, a, b, atol=1e-11)


def test_state_carry_and_strong_decay_stay_finite():
    q, k, v = random_qkv(1, 64, 2, 2, 8, 8, seed=3)
    g = torch.full((1, 64, 2, 4), -50.0, dtype=torch.float64)  # beyond the clamp: a reset per token
    o, _ = gsa_chunked(q.float(), k.float(), v.float(), g.float())
    assert torch.isfinite(o).all()
    g = _decay(1, 64, 2, 4, 5).detach()
    whole, state = gsa_chunked(q, k, v, g)
    first, mid = gsa_chunked(q[:, :27], k[:, :27], v[:, :27], g[:, :27])
    second, end = gsa_chunked(q[:, 27:], k[:, 27:], v[:, 27:], g[:, 27:], initial_state=mid)
    assert_close("split", torch.cat([first, second], 1), whole, atol=1e-12)
    assert_close("state", end[0], state[0], atol=1e-12)


def test_bad_shapes_are_named():
    q, k, v = random_qkv(1, 8, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="log_decay"):
        gsa_chunked(q, k, v, torch.zeros(1, 7, 2, 3))


def test_sequence_parallelism_refuses_gsa_layers():
    from bla.model import BLALM, apply_overrides, load_preset
    from bla.train import sequence_parallel

    model = BLALM(apply_overrides(load_preset("tiny"), ["layer_pattern=[gsa, attn]"]))
    with pytest.raises(ValueError, match="not \\['gsa'\\]"):
        sequence_parallel.enable(model, None)
