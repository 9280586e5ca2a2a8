"""The BLA operator: the properties of spec section 2 for the reference and torch backends."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, random_qkv, random_state

from bla.kernels import GATES, bla_attention, bla_step, dirichlet_gates
from bla.kernels.gates import state_norm_bound

F64 = torch.float64
BACKENDS = ["reference", "torch"]


def sliding_window_attention(q, k, v, window, scale=None):
    """Causal softmax over the last ``window`` positions, written from scratch: positions before
    the start count as zero keys and zero values (they take part in the softmax with score 0)."""
    B, T, H, dk = q.shape
    G = k.shape[2]
    scale = dk**-0.5 if scale is None else scale
    windows = [window] * H if isinstance(window, int) else window
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for h in range(H):
        W, g = windows[h], h // (H // G)
        kp = torch.cat([k.new_zeros(B, W - 1, dk), k[:, :, g]], dim=1)
        vp = torch.cat([v.new_zeros(B, W - 1, v.shape[-1]), v[:, :, g]], dim=1)
        for t in range(T):
            keys, vals = kp[:, t : t + W], vp[:, t : t + W]
            p = torch.softmax(scale * torch.einsum("bd,bwd->bw", q[:, t, h], keys), dim=-1)
            out[:, t, h] = torch.einsum("bw,bwd->bd", p, vals)
    return out


# ---------------------------------------------------------------- gates


@pytest.mark.parametrize("W,m", [(16, 4), (12, 3), (30, 5), (8, 8), (64, 1)])
def test_dirichlet_nodes_symmetry_and_range(W, m):
    r = W // m
    pos = torch.arange(3 * W)
    w, alpha, reset = dirichlet_gates(pos, torch.tensor([W]), m)
    w, alpha, reset = w[:, 0], alpha[:, 0], reset[:, 0]
    for j in range(m):
        for i in range(m):
            assert w[i * r, j] == (1.0 if i == j else 0.0)  # D(theta_i - theta_j) = delta_ij, exactly
    # D is even: w at phase theta_j + x equals w at theta_j - x
    x = torch.arange(1, W)
    j = m - 1
    assert_close("D even", w[(j * r + x) % W, j], w[(j * r - x) % W, j], atol=1e-12)
    # side lobes: -1/3 at m = 3 is the deepest (tending to about -0.22 as m grows)
    assert w.max() <= 1.0 and w.min() >= -1 / 3 - 1e-12
    assert torch.equal(reset, alpha == 0)
    resets_per_slot = 3 * W if m == 1 else 3  # once per period (every token when m = 1)
    assert torch.equal(reset.sum(0), torch.full((m,), resets_per_slot))


def test_dirichlet_matches_formula():
    W, m = 20, 4  # even m: the tan form
    x = torch.arange(1, W)
    w, _, _ = dirichlet_gates(x, torch.tensor([W]), m)
    d = x.double()
    formula = torch.sin(math.pi * m * d / W) / (m * torch.tan(math.pi * d / W))
    formula[x % (W // m) == 0] = 0.0
    assert_close("even-m Dirichlet", w[:, 0, 0], formula, atol=1e-14)


@pytest.mark.parametrize("W,m", [(16, 4), (12, 3), (30, 5), (8, 8), (4096, 4), (1024, 1)])
def test_gate_rules(W, m):
    """s and alpha of every rule from d (spec section 1); v2 decays lie in [0, 1] at any stride."""
    pos = torch.arange(W)
    d, _, reset = dirichlet_gates(pos, torch.tensor([W]), m, gates="dirichlet_v1")
    rules = {"dirichlet": (d, 1 - d**2), "fejer": (d**2, 1 - d**2), "dirichlet_v1": (d, 1 - d)}
    for gates, (s_want, a_want) in rules.items():
        s, alpha, r = dirichlet_gates(pos, torch.tensor([W]), m, gates=gates)
        assert torch.equal(r, reset) and torch.equal(reset, alpha == 0), gates
        assert_close(f"s {gates}", s, s_want, atol=1e-15)
        assert_close(f"alpha {gates}", alpha, a_want, atol=1e-15)
    _, alpha, _ = dirichlet_gates(pos, torch.tensor([W]), m, gates="dirichlet")
    assert alpha.min() >= 0 and alpha.max() <= 1
    if m >= 3 and W > m:  # D's negative side lobes: v1 decays exceed 1
        _, alpha_v1, _ = dirichlet_gates(pos, torch.tensor([W]), m, gates="dirichlet_v1")
        assert alpha_v1.max() > 1.1


def test_unknown_gates_is_a_value_error():
    q, k, v = random_qkv(1, 8, 2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"gates must be one of \('dirichlet', 'fejer', 'dirichlet_v1'\)"):
        bla_attention(q, k, v, 8, 4, gates="dirichlet2")
    with pytest.raises(ValueError, match="gates must be one of"):
        bla_step(q[:, 0], k[:, 0], v[:, 0], None, torch.zeros(1, dtype=torch.long), 8, 4, gates="v2")


# ---------------------------------------------------------------- spec properties


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W,H,Hkv", [(5, 2, 2), (8, 4, 2), ([3, 8], 2, 2)])
def test_swa_limit(backend, W, H, Hkv, gates):
    q, k, v = random_qkv(2, 21, H, Hkv, 6, 5)
    windows = W if isinstance(W, int) else W
    # m = W per head only works for one m; per-head windows use the SWA limit head by head
    if isinstance(W, list):
        for h, w in enumerate(W):
            o, _ = bla_attention(q[:, :, h : h + 1], k[:, :, h : h + 1], v[:, :, h : h + 1], w, w, backend=backend, gates=gates)
            ref = sliding_window_attention(q[:, :, h : h + 1], k[:, :, h : h + 1], v[:, :, h : h + 1], w)
            assert_close(f"o head {h}", o, ref, atol=1e-10)
        return
    o, _ = bla_attention(q, k, v, windows, windows, backend=backend, gates=gates)
    assert_close("o", o, sliding_window_attention(q, k, v, windows), atol=1e-10)


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W,m", [(12, 4), (10, 5), (16, 16)])
def test_finite_window(backend, W, m, gates):
    T, s = 70, 23
    q, k, v = random_qkv(1, T, 2, 2, 4, 4)
    o, _ = bla_attention(q, k, v, W, m, backend=backend, gates=gates)
    k2, v2 = k.clone(), v.clone()
    k2[:, s] += 3.0
    v2[:, s] -= 2.0
    o2, _ = bla_attention(q, k2, v2, W, m, backend=backend, gates=gates)
    changed = (o2 - o).abs().amax(dim=(0, 2, 3))
    assert changed[s] > 0
    assert torch.all(changed[s + W :] == 0), f"token {s} reached outputs after {s + W - 1}"


@pytest.mark.parametrize("gates", GATES)
def test_gsa_special_case(gates):
    """An independent gated-slot recurrence fed s = w and g = log(alpha) (a finite stand-in at
    resets) gives BLA."""
    W, m = 12, 4
    q, k, v = random_qkv(1, 40, 2, 2, 4, 3)
    w, alpha, reset = dirichlet_gates(torch.arange(40), torch.tensor([W, W]), m, gates=gates)
    g = torch.where(reset, torch.full_like(alpha, -1e4), torch.log(alpha.clamp_min(1e-300)))
    K = torch.zeros(2, m, 4, dtype=F64)
    V = torch.zeros(2, m, 3, dtype=F64)
    outs = []
    for t in range(40):
        K = torch.exp(g[t])[..., None] * K + w[t][..., None] * k[0, t][:, None, :]
        V = torch.exp(g[t])[..., None] * V + w[t][..., None] * v[0, t][:, None, :]
        p = torch.softmax(0.5 * torch.einsum("hd,hmd->hm", q[0, t], K), dim=-1)
        outs.append(torch.einsum("hm,hmd->hd", p, V))
    o, _ = bla_attention(q, k, v, W, m, backend="torch", gates=gates)
    assert_close("o", o[0], torch.stack(outs), atol=1e-10)


CASES = [
    # B, T, H, Hkv, dk, dv, window, m
    (2, 37, 2, 2, 4, 3, 8, 4),  # even m
    (2, 37, 2, 2, 4, 3, 9, 3),  # odd m
    (1, 150, 4, 2, 8, 8, 24, 6),  # GQA, W not a multiple of the chunk, T > chunk
    (1, 150, 2, 2, 8, 8, 100, 5),  # W above the chunk size
    (1, 70, 2, 2, 4, 4, [8, 40], 4),  # per-head windows
    (2, 65, 2, 1, 4, 4, 6, 6),  # m = W
    (1, 64, 2, 2, 4, 4, 256, 64),  # many slots, long window
    (1, 40, 2, 2, 4, 4, 8, 1),  # one slot: every token resets it
]


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_equals_reference(case, gates):
    B, T, H, Hkv, dk, dv, W, m = case
    q, k, v = random_qkv(B, T, H, Hkv, dk, dv)
    s0 = random_state(B, Hkv, m, dk, dv)
    for kwargs in ({}, {"initial_state": s0, "offset": 5}, {"offset": torch.arange(B) * 7 + 3}):
        o_r, s_r = bla_attention(q, k, v, W, m, output_final_state=True, backend="reference", gates=gates, **kwargs)
        o_t, s_t = bla_attention(q, k, v, W, m, output_final_state=True, backend="torch", gates=gates, **kwargs)
        assert_close(f"o {list(kwargs)}", o_t, o_r, atol=1e-10)
        assert_close(f"K {list(kwargs)}", s_t[0], s_r[0], atol=1e-10)
        assert_close(f"V {list(kwargs)}", s_t[1], s_r[1], atol=1e-10)


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("W,m,Hkv", [(6, 3, 1), (8, 4, 2), (4, 4, 2)])
def test_torch_gradcheck(W, m, Hkv, gates):
    q, k, v = random_qkv(1, 11, 2, Hkv, 3, 2, requires_grad=True)
    K0, V0 = random_state(1, Hkv, m, 3, 2, requires_grad=True)

    def f(q, k, v, K0, V0):
        o, (K, V) = bla_attention(q, k, v, W, m, initial_state=(K0, V0), output_final_state=True, offset=2, backend="torch",
                                    gates=gates)
        return o, K, V

    assert torch.autograd.gradcheck(f, (q, k, v, K0, V0), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_carry(backend, gates):
    W, m, T, cut = 10, 5, 53, 22
    q, k, v = random_qkv(2, T, 2, 2, 4, 4)
    kw = dict(output_final_state=True, backend=backend, gates=gates)
    o, s = bla_attention(q, k, v, W, m, **kw)
    o1, s1 = bla_attention(q[:, :cut], k[:, :cut], v[:, :cut], W, m, **kw)
    o2, s2 = bla_attention(q[:, cut:], k[:, cut:], v[:, cut:], W, m, initial_state=s1, offset=cut, **kw)
    assert_close("o", torch.cat([o1, o2], 1), o, atol=1e-10)
    assert_close("K", s2[0], s[0], atol=1e-10)
    assert_close("V", s2[1], s[1], atol=1e-10)


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_loop(backend, gates):
    lengths = [0, 1, 17, 0, 70, 2]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    T = int(cu[-1])
    W, m = 12, 4
    q, k, v = random_qkv(1, T, 4, 2, 4, 3)
    N = len(lengths)
    s0 = random_state(N, 2, m, 4, 3)
    off = torch.tensor([0, 3, 0, 5, 11, 1])
    o, (K, V) = bla_attention(
        q, k, v, W, m, cu_seqlens=cu, initial_state=s0, offset=off, output_final_state=True, backend=backend, gates=gates
    )
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        init = (s0[0][n : n + 1], s0[1][n : n + 1])
        o_n, (K_n, V_n) = bla_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], W, m, initial_state=init, offset=int(off[n]), output_final_state=True,
            backend="reference", gates=gates,
        )
        assert_close(f"o doc {n}", o[:, a:b], o_n, atol=1e-10)
        assert_close(f"K doc {n}", K[n : n + 1], K_n, atol=1e-10)
        assert_close(f"V doc {n}", V[n : n + 1], V_n, atol=1e-10)


def test_empty_document_keeps_initial_state():
    q, k, v = random_qkv(1, 5, 2, 2, 4, 4)
    s0 = random_state(2, 2, 4, 4, 4)
    cu = torch.tensor([0, 0, 5])
    _, (K, V) = bla_attention(q, k, v, 8, 4, cu_seqlens=cu, initial_state=s0, output_final_state=True, backend="torch")
    assert torch.equal(K[0], s0[0][0]) and torch.equal(V[0], s0[1][0])


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("W,m", [(8, 4), (9, 3), ([8, 16], 4)])
def test_step_decoding_equals_parallel(W, m, gates):
    T = 30
    q, k, v = random_qkv(2, T, 4, 2, 4, 3)
    o_par, s_par = bla_attention(q, k, v, W, m, output_final_state=True, backend="torch", gates=gates)
    state = None
    for t in range(T):
        o_t, state = bla_step(q[:, t], k[:, t], v[:, t], state, torch.full((2,), t), W, m, gates=gates)
        assert_close(f"o step {t}", o_t, o_par[:, t], atol=1e-10)
    assert_close("K", state[0], s_par[0], atol=1e-10)
    assert_close("V", state[1], s_par[1], atol=1e-10)


def _max_slot_norm_ratio(W, m, gates, T, seed=0):
    """The float64 recurrence with random unit keys: max over time and slots of |K_t[j]| / |k|."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(T, 8, generator=gen, dtype=F64), dim=-1)
    s, alpha, _ = dirichlet_gates(torch.arange(T), torch.tensor([W]), m, gates=gates)
    K, worst = torch.zeros(m, 8, dtype=F64), 0.0
    for t in range(T):
        K = alpha[t, 0, :, None] * K + s[t, 0, :, None] * keys[t]
        worst = max(worst, float(K.norm(dim=-1).max()))
    return worst


@pytest.mark.parametrize("gates", ["dirichlet", "fejer"])
@pytest.mark.parametrize("stride", [64, 256, 1024])
def test_v2_state_is_bounded_at_any_stride(gates, stride):
    """Spec section 2: v2 slot norms never exceed the largest key norm times max_j sum |s_t[j]|
    over one period, and the chunked backend equals the float64 recurrence with finite outputs."""
    m = 4
    W = m * stride
    T = W + W // 2 + 3
    ratio = _max_slot_norm_ratio(W, m, gates, T)
    assert ratio <= state_norm_bound(W, m, gates) + 1e-9
    q, k, v = random_qkv(1, T, 1, 1, 8, 8, seed=stride)
    o_r, s_r = bla_attention(q, k, v, W, m, output_final_state=True, backend="reference", gates=gates)
    o_t, s_t = bla_attention(q, k, v, W, m, output_final_state=True, backend="torch", gates=gates)
    assert_close("o", o_t, o_r, atol=1e-9)
    assert_close("K", s_t[0], s_r[0], atol=1e-9)
    o32, _ = bla_attention(q.float(), k.float(), v.float(), W, m, backend="torch", gates=gates)
    assert_close("o fp32", o32, o_r, atol=1e-3)


def test_v1_state_grows_past_the_bound():
    """Why v1 is not the default: at W/m = 256 a slot amplifies what it holds by ~1.22^256."""
    m, stride = 4, 256
    W = m * stride
    ratio = _max_slot_norm_ratio(W, m, "dirichlet_v1", W + 3)
    bound = state_norm_bound(W, m, "dirichlet_v1")
    assert ratio > 1e6 * bound, (ratio, bound)


def test_low_precision_inputs_accumulate_in_float32():
    q, k, v = random_qkv(1, 80, 2, 2, 8, 8, dtype=torch.bfloat16)
    o, (K, V) = bla_attention(q, k, v, 16, 4, output_final_state=True, backend="torch")
    assert o.dtype == torch.bfloat16 and K.dtype == torch.float32
    o64, _ = bla_attention(q.double(), k.double(), v.double(), 16, 4, backend="reference")
    assert_close("o bf16", o, o64, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------- bad input


def _call(**over):
    q, k, v = random_qkv(1, 8, 2, 2, 4, 4)
    args = dict(q=q, k=k, v=v, window=8, slots=4)
    args.update(over)
    return bla_attention(**args)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"slots": 3}, "slots=3 must divide"),
        ({"window": 2}, "must divide every window and be at most it"),
        ({"window": [8, 8, 8]}, "list of 3"),
        ({"k": torch.randn(1, 9, 2, 4)}, "must agree"),
        ({"q": torch.randn(1, 8, 3, 4)}, "multiple of k/v heads"),
        ({"v": torch.randn(1, 8, 2, 4, dtype=torch.float32)}, "share one dtype"),
        ({"q": torch.ones(1, 8, 2, 4, dtype=torch.int64)}, "floating dtype"),
        ({"initial_state": (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4, 4))}, r"initial_state must be \(K \[1, 2, 4, 4\]"),
        ({"cu_seqlens": torch.tensor([0, 5, 3, 8])}, "non-decreasing"),
        ({"cu_seqlens": torch.tensor([0, 5, 7])}, "end at T=8"),
        ({"offset": -1}, "non-negative"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_input_raises_value_error(over, match):
    if "q" in over and over["q"].dtype == torch.float32 and over["q"].shape[2] == 3:
        over = {**over, "q": over["q"].double()}
    if "k" in over:
        over = {**over, "k": over["k"].double()}
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_bla_step_bad_state():
    q = torch.randn(2, 2, 4)
    with pytest.raises(ValueError, match="state must be"):
        bla_step(q, q, q, (torch.zeros(2, 2, 4, 4),), torch.zeros(2, dtype=torch.long), 8, 4)
    with pytest.raises(ValueError, match="position must be an integer tensor"):
        bla_step(q, q, q, None, torch.zeros(2), 8, 4)


def test_value_checks_read_nothing_back_from_the_device_when_skipped():
    """The model's layers call the operator with validate_values=False: then no check reads a
    tensor's values (on a GPU, a host synchronisation per call). Meta tensors have no values, so
    any such read raises; the same calls with the checks on do read them."""
    from bla.kernels.checks import check_problem, check_step

    q = torch.empty(1, 16, 2, 4, device="meta")
    cu, offset = torch.empty(3, dtype=torch.int64, device="meta"), torch.empty(2, dtype=torch.int64, device="meta")
    problem = check_problem(q, q, q, 8, 4, None, None, cu, offset, validate_values=False)
    assert (problem.num_seqs, problem.windows) == (2, (8, 8))
    with pytest.raises(Exception, match="meta"):
        check_problem(q, q, q, 8, 4, None, None, cu, offset)
    q1, position = torch.empty(2, 2, 4, device="meta"), torch.empty(2, dtype=torch.int64, device="meta")
    assert check_step(q1, q1, q1, None, position, 8, 4, None, validate_values=False).batch == 2
    with pytest.raises(Exception, match="meta"):
        check_step(q1, q1, q1, None, position, 8, 4, None)


@pytest.mark.gpu
def test_a_model_training_step_has_no_host_sync_from_the_operators_checks():
    """On the GPU, with CUDA's sync debug mode raising: the operator's checks of a packed batch
    (what the model passes) read nothing back; with the value checks on they would."""
    from bla.kernels.checks import check_problem

    q = torch.randn(1, 64, 2, 8, device="cuda")
    cu = torch.tensor([0, 20, 64], device="cuda")
    offset = torch.zeros(2, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        check_problem(q, q, q, 16, 4, None, None, cu, offset, validate_values=False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            check_problem(q, q, q, 16, 4, None, None, cu, offset)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_gpu_benchmark_reports_flex_over_bla_for_every_row():
    """The GPU benchmark's ratios (flex SWA's time over BLA's, above 1 when BLA is faster), for rows
    of every m from the flex timing at the same (W, d, T), and its table of them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from kernel_gpu import add_ratios, table

    flex = dict(W=512, m=64, d=64, B=4, T=8192, bla_fwd_ms=0.4, bla_fwdbwd_ms=1.3, bla_fwdbwd_kernels_ms=1.28,
                flex_swa_fwd_ms=0.32, flex_swa_fwdbwd_ms=1.56)  # fmt: skip
    add_ratios(flex, flex)
    wider = add_ratios(dict(W=512, m=128, d=64, B=4, T=8192, bla_fwd_ms=0.8, bla_fwdbwd_ms=3.12), flex)
    alone = add_ratios(dict(W=512, m=64, d=64, B=4, T=8192, bla_fwd_ms=0.4, bla_fwdbwd_ms=1.3), None)
    assert flex["flex_over_bla_fwd"] == pytest.approx(0.8) and flex["flex_over_bla_fwdbwd"] == pytest.approx(1.2)
    assert wider["flex_over_bla_fwdbwd"] == pytest.approx(0.5) and "flex_over_bla_fwd" in wider
    assert "flex_over_bla_fwd" not in alone
    lines = table([flex, wider, alone, dict(first_fwd_s=3.0)]).splitlines()
    assert len(lines) == 5 and "1.20" in lines[2] and "0.50" in lines[3] and lines[4].rstrip().endswith("-")
