"""torch.compile and the custom operators: opcheck on the Triton ops (in the interpreter), BLA
blocks traced without a graph break, compiled training equal to eager, activation checkpointing
policies equal to none."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bla.kernels import bla_attention
from bla.kernels.checks import check_problem
from bla.model import BLALM, apply_overrides, load_preset
from bla.train.config import TrainConfig, load_train_config
from helpers import assert_close, random_qkv, random_state

triton_ops = pytest.importorskip("bla.kernels.triton_ops")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton's interpreter on a CPU


def _fwd_args(q, k, v, window, slots, gates="dirichlet", state=None, cu_seqlens=None, phase_shift=0):
    p = check_problem(q, k, v, window, slots, None, state, cu_seqlens, 0, gates, phase_shift=phase_shift)
    h0k, h0v = state if state is not None else (None, None)
    return (q, k, v, h0k, h0v, p.cu_seqlens, p.offset, list(p.windows), p.slots, p.scale, p.gates, triton_ops.op_shifts(p))


@pytest.mark.parametrize("case", ["dense", "initial_state", "varlen_with_empty_documents", "gqa_per_head_windows", "phase_shift"])
def test_the_chunk_op_passes_opcheck(case):
    q, k, v = random_qkv(2, 40, 2, 2, 16, 8, dtype=torch.float32, seed=3, device=DEVICE, requires_grad=True)
    if case == "dense":
        args = _fwd_args(q, k, v, 16, 4)
    elif case == "initial_state":
        state = tuple(s.float().to(DEVICE).requires_grad_() for s in random_state(2, 2, 4, 16, 8))
        args = _fwd_args(q, k, v, 8, 4, "fejer", state)
    elif case == "varlen_with_empty_documents":
        q1, k1, v1 = (x[:1].detach().clone().requires_grad_() for x in (q, k, v))
        args = _fwd_args(q1, k1, v1, 16, 4, cu_seqlens=torch.tensor([0, 0, 1, 30, 40], device=DEVICE))
    elif case == "phase_shift":
        args = _fwd_args(q, k, v, 16, 4, "fejer", phase_shift=[1, 3])
    else:
        q, k, v = random_qkv(1, 33, 4, 2, 16, 16, dtype=torch.float32, seed=4, device=DEVICE, requires_grad=True)
        args = _fwd_args(q, k, v, [8, 32], 4, "dirichlet_v1")
    torch.library.opcheck(torch.ops.bla.chunk_fwd.default, args)


def test_eager_calls_take_the_lean_path_and_traced_calls_the_custom_op():
    """Eager calls run a plain autograd.Function (the custom operator's machinery was most of the
    host time of a call); under a dispatch mode (fake tensors, the ops checkpointing policy) or
    torch.compile the call is the custom op, which those must see. Both give the same outputs and
    gradients, final state included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = random_qkv(1, 40, 2, 2, 8, 8, dtype=torch.float32, seed=6, device=DEVICE, requires_grad=True)
    runs = []
    for traced in (False, True):
        mode = Ops()
        with mode if traced else torch.enable_grad():
            o, (K, V) = bla_attention(q, k, v, 8, 4, output_final_state=True, backend="triton")
            grads = torch.autograd.grad((o * o).sum() + K.sum(), (q, k, v))
        assert ("bla.chunk_fwd.default" in mode.seen) == traced, mode.seen
        assert ("bla.chunk_bwd.default" in mode.seen) == traced
        runs.append((o, K, V, *grads))
    assert type(runs[0][0].grad_fn).__name__ == "_ChunkBackward"
    for name, a, b in zip(["o", "K", "V", "dq", "dk", "dv"], *runs):
        assert_close(name, a, b, atol=0, rtol=0)


def test_the_decode_op_passes_opcheck_and_updates_the_state_in_place():
    q, k, v = (x[:, 0] for x in random_qkv(3, 1, 4, 2, 16, 8, dtype=torch.float32, seed=5, device=DEVICE))
    sk, sv = (s.float().to(DEVICE) for s in random_state(3, 2, 4, 16, 8))
    position = torch.tensor([0, 7, 31], device=DEVICE)
    from bla.kernels.reference import step_reference

    for shifts in ([0, 0], [2, 1]):  # plain, and staggered heads (spec section 6)
        args = (q, k, v, sk.clone(), sv.clone(), position, [16, 16], 4, 0.25, "dirichlet", shifts)
        torch.library.opcheck(torch.ops.bla.step_.default, args)
        o = torch.ops.bla.step_(*args)
        shift = torch.tensor(shifts, device=DEVICE) if any(shifts) else None
        o_ref, (k_ref, v_ref) = step_reference(q, k, v, (sk, sv), position, torch.tensor([16, 16], device=DEVICE), 4, 0.25,
                                               gates="dirichlet", shift_G=shift)  # fmt: skip
        assert_close("o", o, o_ref, atol=1e-5)
        assert_close("K updated in place", args[3], k_ref, atol=1e-5)
        assert_close("V updated in place", args[4], v_ref, atol=1e-5)


def test_triton_available_is_marked_as_torch_compiler_marks_a_constant():
    """kernels/api.py marks it without importing torch._dynamo: the mark must be the decorator's."""
    from bla.kernels import triton_available

    probe = torch.compiler.assume_constant_result(lambda: None)
    assert set(vars(probe)) == {"_dynamo_marked_constant"} and triton_available._dynamo_marked_constant is True


def test_the_operator_compiles_without_a_graph_break():
    q, k, v = random_qkv(2, 40, 2, 2, 16, 16, dtype=torch.float32, seed=6, device=DEVICE, requires_grad=True)

    def f(q, k, v):
        o, (K, V) = bla_attention(q, k, v, 16, 4, backend="triton", output_final_state=True, validate_values=False)
        return o.square().sum() + K.sum() + V.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break fails
    expected = f(q, k, v)
    grads = torch.autograd.grad(expected, (q, k, v))
    got = compiled(q, k, v)
    assert_close("loss", got, expected, atol=1e-5)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v)), grads):
        assert_close(f"d{name}", a, b, atol=1e-5)


def _model(pattern: str, **bla) -> BLALM:
    over = [f"layer_pattern={pattern}"] + [f"bla.{k}={v}" for k, v in bla.items()]
    torch.manual_seed(0)
    return BLALM(apply_overrides(load_preset("tiny"), over)).to(DEVICE)


def _loss_and_grads(model: BLALM, ids: torch.Tensor):
    model.zero_grad()
    loss = model(ids[:, :-1], targets=ids[:, 1:], loss_chunk=16).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("policy", ["block", "ops"])
def test_activation_checkpointing_policies_equal_no_checkpointing(policy):
    model = _model("[bla,attn,swa]")
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    loss, grads = _loss_and_grads(model, ids)
    model.set_checkpointing(policy)
    loss2, grads2 = _loss_and_grads(model, ids)
    assert_close("loss", loss2, loss, atol=1e-5)
    for i, (a, b) in enumerate(zip(grads2, grads)):
        assert_close(f"grad {i}", a, b, atol=1e-5)
    with pytest.raises(ValueError, match="activation checkpointing must be one of"):
        model.set_checkpointing("all")
    from torch.utils.checkpoint import CheckpointPolicy

    from bla.model.lm import _saved_by_ops_policy

    kept = {op: _saved_by_ops_policy(None, op) for op in (torch.ops.bla.chunk_fwd.default, torch.ops.aten.mm.default, torch.ops.aten.mul.Tensor)}
    assert kept == {torch.ops.bla.chunk_fwd.default: CheckpointPolicy.MUST_SAVE, torch.ops.aten.mm.default: CheckpointPolicy.MUST_SAVE,
                    torch.ops.aten.mul.Tensor: CheckpointPolicy.PREFER_RECOMPUTE}  # fmt: skip


@pytest.mark.parametrize("policy", ["none", "ops"])
def test_compiled_bla_blocks_trace_whole_and_equal_eager(policy):
    eager, compiled = _model("[bla]", backend="triton"), _model("[bla]", backend="triton")
    for m in (eager, compiled):
        m.set_checkpointing(policy)
    compiled.compile_blocks(fullgraph=True, backend="aot_eager")
    # the chunked loss is compiled too (its chunks whole: fullgraph), without the blocks' mode
    assert compiled.head.loss_compile == {"fullgraph": True, "backend": "aot_eager"} and eager.head.loss_compile is None
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss, grads = _loss_and_grads(eager, ids)
    loss2, grads2 = _loss_and_grads(compiled, ids)
    assert_close("loss", loss2, loss, atol=1e-5)
    for i, (a, b) in enumerate(zip(grads2, grads)):
        assert_close(f"grad {i}", a, b, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep the eager names


def test_compile_settings():
    assert TrainConfig().compiles("cuda") and not TrainConfig().compiles("cpu")
    assert not load_train_config("tiny", ["zero_stage=3"]).compiles("cuda")
    assert load_train_config("tiny", ["compile=true"]).compiles("cpu")
    with pytest.raises(ValueError, match="compile=true with zero_stage=3"):
        load_train_config("tiny", ["compile=true", "zero_stage=3"])
    with pytest.raises(ValueError, match="compile must be auto, true or false"):
        load_train_config("tiny", ["compile=maybe"])
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        load_train_config("tiny", ["activation_checkpointing=some"])
    # CUDA graphs replay the compiled blocks: packed documents too, never without compiled blocks
    mqar = ["data.task=mqar", "data.mqar.vocab_size=128"]
    assert load_train_config("tiny", [*mqar, "cuda_graphs=true"]).cuda_graphs
    assert load_train_config("tiny", ["data.task=lm", "cuda_graphs=true"]).cuda_graphs
    for bad in (["compile=false"], ["zero_stage=3"]):
        with pytest.raises(ValueError, match="cuda_graphs=true replays the compiled blocks"):
            load_train_config("tiny", [*mqar, "cuda_graphs=true", *bad])
    with pytest.raises(ValueError, match="cuda_graphs must be true or false"):
        load_train_config("tiny", ["cuda_graphs=sometimes"])
    # configs saved before the policies existed held a bool
    assert TrainConfig.from_dict({"activation_checkpointing": True}).activation_checkpointing == "block"
    assert TrainConfig.from_dict({"activation_checkpointing": False}).activation_checkpointing == "none"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of a run without a CUDA device")
def test_cuda_graphs_without_a_cuda_device_are_refused_by_name(tmp_path):
    args = ["tiny", f"out_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "data.task=mqar", "data.seq_len=64",
            "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=128", "cuda_graphs=true", "steps=2", "progress=false"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "bla.train.cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "cuda_graphs=true needs a CUDA device; this run is on cpu" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_compiled_training_equals_eager_training(tmp_path):
    """The trainer with compile=true (inductor on the CPU) against compile=false: the same losses."""
    summaries = {}
    for compiled in ("true", "false"):
        out = tmp_path / compiled
        # MQAR data: no tokenizer or shards to build; the tiny hybrid (bla, attn, swa) model
        args = ["tiny", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}", "steps=3", "log_every=1", "eval_every=3",
                "save_every=3", f"compile={compiled}", "activation_checkpointing=ops", "progress=false", "data.task=mqar",
                "data.seq_len=64", "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=128", "eval_batches=2"]  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "bla.train.cli", *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "first step:" in done.stdout
        summaries[compiled] = json.loads((out / "summary.json").read_text())
    got, want = ([h["loss"] for h in summaries[c]["losses"]] for c in ("true", "false"))
    assert len(got) == 3 and got == pytest.approx(want, abs=2e-4), (got, want)
    assert summaries["true"]["val_loss"] == pytest.approx(summaries["false"]["val_loss"], abs=2e-4)
