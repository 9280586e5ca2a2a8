"""Evaluation: MQAR data and metric, MQAR training beats chance, generation, perplexity, memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_close

from bla.launch.layout import fresh_process_env
from bla.data.synthetic import MQARConfig, TaskLoader, mqar_examples
from bla.eval.generate import generate
from bla.data.task import label_accuracy
from bla.eval.memory import measure, plot, throughput
from bla.eval.perplexity import by_position, document_nll, position_edges, token_nll
from bla.model import BLALM, apply_overrides, load_preset


def test_mqar_structure():
    L, K, V = 64, 8, 128
    x, y = mqar_examples(200, L, MQARConfig(K, V), seed=3)
    assert x.shape == y.shape == (200, L)
    for i in range(200):
        keys, values = x[i, 0 : 2 * K : 2], x[i, 1 : 2 * K : 2]
        assert ((1 <= keys) & (keys < V // 2)).all() and ((V // 2 <= values) & (values < V)).all()
        assert len(set(keys.tolist())) == K and len(set(values.tolist())) == K  # without replacement
        pos = (y[i] != -100).nonzero()[:, 0]
        assert len(pos) == K and (pos >= 2 * K).all() and ((pos - 2 * K) % 2 == 0).all()
        lookup = dict(zip(keys.tolist(), values.tolist()))
        assert all(lookup[int(x[i, p])] == int(y[i, p]) for p in pos)  # the label at a query is its value
        rest = torch.ones(L, dtype=torch.bool)
        rest[: 2 * K] = False
        rest[pos] = False
        assert (x[i, rest] == 0).all()  # filler
    gaps = ((y != -100).nonzero()[:, 1] - 2 * K) // 2
    assert gaps.float().mean() < 0.35 * (L - 2 * K) / 2  # power law, a = 0.01: short gaps dominate


def test_mqar_determinism_filler_and_errors():
    a = mqar_examples(4, 32, MQARConfig(4, 64), seed=1)
    b = mqar_examples(4, 32, MQARConfig(4, 64), seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, _ = mqar_examples(4, 32, MQARConfig(4, 64, random_filler=True), seed=1)
    assert (x != 0).all()
    with pytest.raises(ValueError, match="4K <= L < V"):
        mqar_examples(1, 32, MQARConfig(16, 64), seed=0)
    loader = TaskLoader(lambda n, s: mqar_examples(n, 32, MQARConfig(4, 64), s), 2, seed=0)
    first = [b["input_ids"] for _, b in zip(range(4), loader)]
    resumed = TaskLoader(lambda n, s: mqar_examples(n, 32, MQARConfig(4, 64), s), 2, seed=0)
    resumed.load_state_dict({"next_batch": 2, "world_size": 1})
    assert all(torch.equal(u, v) for u, v in zip(first[2:], [b["input_ids"] for _, b in zip(range(2), resumed)]))


def test_label_accuracy_on_hand_made_cases():
    logits = torch.full((2, 4, 5), -1.0)
    logits[0, 1, 3] = logits[0, 3, 2] = 1.0  # example 0 predicts 3 at t=1, 2 at t=3
    logits[1, 0, 4] = 1.0
    labels = torch.tensor([[-100, 3, -100, 1], [4, -100, -100, -100]])
    assert label_accuracy(logits, labels).tolist() == [0.5, 1.0]


@pytest.mark.slow
def test_tiny_model_learns_easy_mqar(tmp_path):
    out = tmp_path / "mq"
    args = ["mqar", f"out_dir={out}", "steps=200", "micro_batch=32", "data.seq_len=64", "data.mqar.num_kv_pairs=4",
            "data.mqar.vocab_size=128", "model.vocab_size=128", "model.bla.window=64", "model.bla.slots=16",
            "optim.lr=3e-3", "optim.warmup_steps=20", "eval_every=200", "eval_batches=8", "save_every=200", "progress=false"]  # fmt: skip
    env = fresh_process_env()
    done = subprocess.run([sys.executable, "-m", "bla.train.cli", *args], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    acc = json.loads((out / "summary.json").read_text())["val_accuracy"]
    assert acc > 0.15, acc  # chance: 1 / 64 values
    score = subprocess.run([sys.executable, "-m", "bla.launch.cli", "eval", "mqar", "--run", str(out), "--num-kv-pairs", "4",
                            "--examples", "200"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert score.returncode == 0 and float(score.stdout.split()[-1]) > 0.15, score.stdout + score.stderr[-2000:]


def test_mqar_spread_placement():
    """The placement ablation: pair i at 2 i L / 4K (evenly over the first half), every key queried
    once in the second half; the same keys, values and labels otherwise."""
    L, K, V = 64, 4, 128
    x, y = mqar_examples(50, L, MQARConfig(K, V, placement="spread"), seed=3)
    stride = L // (4 * K)
    for i in range(50):
        pairs = 2 * stride * torch.arange(K)
        keys, values = x[i, pairs], x[i, pairs + 1]
        assert ((1 <= keys) & (keys < V // 2)).all() and ((V // 2 <= values) & (values < V)).all()
        asked = (y[i] != -100).nonzero()[:, 0]  # the label sits at the query's position (shifted by one)
        assert len(asked) == K and bool((asked >= L // 2).all())
        assert sorted(x[i, asked].tolist()) == sorted(keys.tolist())
        assert {int(y[i, a]) for a in asked} == set(values.tolist())
    with pytest.raises(ValueError, match="placement must be start or spread"):
        MQARConfig(K, V, placement="middle").check(L)


def _tiny(pattern="[bla, attn, swa]"):
    torch.manual_seed(0)
    return BLALM(apply_overrides(load_preset("tiny"), [f"layer_pattern={pattern}"])).eval()


def test_greedy_generation_equals_full_forward_argmax():
    model = _tiny()
    prompt = torch.randint(3, 256, (2, 7))
    out = generate(model, prompt, max_new_tokens=20)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_is_seeded_and_respects_top_k():
    model = _tiny()
    prompt = torch.randint(3, 256, (1, 5))
    a = generate(model, prompt, 15, temperature=1.0, top_k=3, seed=1)
    b = generate(model, prompt, 15, temperature=1.0, top_k=3, seed=1)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 2, top_p=0.0)


def test_batched_generation_of_prompts_of_other_lengths_equals_each_alone():
    """Each prompt prefilled alone, the caches stacked, decoded together at per-row positions (BLA's
    phase, RoPE, the short convolution, attention's and SWA's masks): greedy results as alone."""
    torch.manual_seed(0)
    cfg = apply_overrides(load_preset("tiny"), ["layer_pattern=[bla, attn, swa]", "swa_window=8", "bla.window=16",
                                                "bla.slots=4", "attn_short_conv=3"])  # fmt: skip
    model = BLALM(cfg).eval()
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (3, 11, 1, 25)]  # shorter and longer than the windows
    batched = generate(model, prompts, 20)
    assert batched == [generate(model, torch.tensor([p]), 20)[0].tolist() for p in prompts]
    sampled = generate(model, prompts, 6, temperature=1.0, top_k=5, seed=3, eos_id=7)
    assert all(out[: len(p)] == p and 0 < len(out) - len(p) <= 6 for p, out in zip(prompts, sampled))
    with pytest.raises(ValueError, match="non-empty id lists"):
        generate(model, [[5], []], 2)


@pytest.mark.parametrize("pattern", ["[bla]", "[bla, swa]"])
def test_windowed_scoring_with_carried_state_equals_full_forward(pattern):
    model = _tiny(pattern)
    ids = [1, *torch.randint(3, 256, (150,)).tolist(), 2]
    nll, n = document_nll(model, ids, context=32, device="cpu")
    x = torch.tensor(ids)[None]
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(x[:, :-1]).logits[0], x[0, 1:], reduction="sum")
    assert n == len(ids) - 1
    assert_close("nll", torch.tensor(nll), full, atol=1e-3, rtol=1e-5)


def test_loss_by_position_buckets_the_token_losses_by_their_place_in_the_document():
    model = _tiny("[bla]")
    ids = [1, *torch.randint(3, 256, (150,), generator=torch.Generator().manual_seed(0)).tolist(), 2]  # positions 0..151
    nll = token_nll(model, ids, context=32, device="cpu")
    assert nll.shape == (151,) and float(nll.sum()) == pytest.approx(document_nll(model, ids, 32, "cpu")[0])
    sums, counts = torch.zeros(152, dtype=torch.float64), torch.zeros(152, dtype=torch.float64)
    sums[1:], counts[1:] = nll, 1  # the token at position p is predicted by nll[p - 1]
    assert position_edges(152) == [0, 64, 128, 256]
    rows = by_position(sums, counts, position_edges(152))
    assert [(r["from"], r["to"], r["tokens"]) for r in rows] == [(0, 64, 63), (64, 128, 64), (128, 256, 24)]
    assert rows[1]["loss"] == pytest.approx(float(nll[63:127].mean())) and rows[2]["loss"] == pytest.approx(float(nll[127:].mean()))
    assert by_position(sums, torch.zeros(152), [0, 64]) == []  # empty buckets are left out


@pytest.mark.slow
def test_perplexity_of_a_checkpoint_on_the_embedded_validation_split(tiny_run, capsys):
    env = fresh_process_env()
    run = tiny_run / "run"
    done = subprocess.run([sys.executable, "-m", "bla.launch.cli", "eval", "perplexity", "--run", str(run), "--max-docs", "3"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout holds the result alone (DeepSpeed's log goes to stderr)
    assert result["docs"] == 3 and 1.0 < result["ppl"] < 512  # below the 512-token vocabulary's uniform guess
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / np.log(2) / result["bytes"])
    buckets = result["loss_by_position"]  # they cover every token, and their weighted mean is the loss
    assert sum(b["tokens"] for b in buckets) == result["tokens"]
    assert sum(b["loss"] * b["tokens"] for b in buckets) / result["tokens"] == pytest.approx(result["loss"])
    assert "positions      0-63" in done.stderr
    bad_args = [  # meaningless: refused in one line before the model loads, no 0.0 loss, no traceback
        (["eval", "perplexity", "--context", "-1"], "argument --context: expected a positive integer, got -1"),
        (["eval", "perplexity", "--context", "0"], "argument --context: expected a positive integer, got 0"),
        (["eval", "perplexity", "--max-docs", "0"], "argument --max-docs: expected a positive integer"),
        (["eval", "perplexity", "--device", "nonsense"], "'nonsense' is not a device: expected cpu, cuda or cuda:N"),
        (["generate", "--prompt", "x", "--max-new-tokens", "-3"], "argument --max-new-tokens: expected a positive integer"),
        (["generate", "--prompt", "x", "--top-p", "0"], "argument --top-p: expected a probability in (0, 1]"),
    ]
    if not torch.cuda.is_available():
        bad_args.append((["generate", "--prompt", "x", "--device", "cuda"], "cuda: no CUDA device here"))
    from bla.launch.cli import main

    capsys.readouterr()
    for bad, says in bad_args:  # in this process: a traceback would be an exception here (and no process's imports)
        try:
            code = main([*bad, "--run", str(run)])
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
        stderr = capsys.readouterr().err
        assert code == 2 and says in stderr.strip().splitlines()[-1], stderr[-2000:]
    prompts = ["def main(", "import"]  # one batch of two prompts of other lengths
    done = subprocess.run([sys.executable, "-m", "bla.launch.cli", "generate", "--run", str(run), "--prompt", prompts[0],
                           "--prompt", prompts[1], "--max-new-tokens", "8"], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    printed = "\n" + done.stdout
    first, second = printed.find(f"\n{prompts[0]}"), printed.find(f"\n{prompts[1]}")
    assert 0 <= first < second, done.stdout[-2000:]  # each prompt with its continuation, in order


def test_memory_benchmark_on_cpu(tmp_path):
    rows = []
    for mixer in ("bla", "swa", "attn"):
        rows += measure("tiny", mixer, [64, 256], decode_steps=3, chunk=64, device=torch.device("cpu"), dtype=torch.float32)
    cache = {(r["mixer"], r["context"]): r["cache_mb"] for r in rows}
    assert cache[("bla", 64)] == cache[("bla", 256)]  # constant state
    assert cache[("swa", 64)] == cache[("swa", 256)]  # window of 16 < 64
    # linear in context: 192 more tokens of fp32 keys and values in each of the 3 layers (2 kv heads
    # of 16), and of their int64 positions
    assert (cache[("attn", 256)] - cache[("attn", 64)]) * 2**20 == 192 * 3 * (2 * (2 * 16) * 4 + 8)
    batched = throughput("tiny", "bla", 16, [1, 3], decode_steps=2, device=torch.device("cpu"), dtype=torch.float32)
    assert [r["batch"] for r in batched] == [1, 3] and all(r["tokens_per_s"] > 0 for r in batched)
    plot(rows, str(tmp_path / "m.png"), "test")
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_slot_weights_are_the_recurrences_state_on_one_hot_keys():
    """slot_capacity's weights S_t[j, u] equal the state the BLA recurrence builds from one-hot
    keys (k_u = e_u), for every gates rule."""
    from bla.eval.slot_capacity import slot_weights
    from bla.kernels import GATES, bla_attention

    T, W, m = 24, 12, 4
    keys = torch.eye(T, dtype=torch.float64)[None, :, None, :]  # [1, T, 1, T]
    for gates in GATES:
        weights = slot_weights(T, W, m, gates)
        for t in (5, T - 1):
            k = keys[:, : t + 1]
            _, (K, _) = bla_attention(k, k, k, W, m, output_final_state=True, backend="reference", gates=gates)
            assert torch.allclose(weights[t], K[0, 0], atol=1e-12), (gates, t)


def test_slot_capacity_at_one_slot_per_position_is_the_sliding_windows():
    """With m = W every slot holds one position until the next token of its phase (BLA is SWA
    there), so the share of MQAR queries whose pair a slot holds is SWA's at the same window;
    fewer slots hold fewer pairs."""
    from bla.eval.slot_capacity import capacity_table

    rows = capacity_table(seq_len=64, num_pairs=4, window=16, slots=[4, 16], swa=[16], gates=["dirichlet"],
                          placements=["start"], examples=40)  # fmt: skip
    bla4, bla16, swa16 = rows
    assert (bla16["slots"], swa16["window"]) == (16, 16)
    assert bla16["majority"] == bla16["plurality"] == swa16["majority"]
    assert 0 < swa16["majority"] < 1  # some queries come after their pair left the window
    assert bla4["plurality"] <= bla16["plurality"]
