"""RegBench: automaton sampling rules, deduplication, disjoint pools, sequences, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bla.data.regbench import (
    FIRST_LETTER, PAD, SEP, RegBenchConfig, _minimal_and_reachable, automaton_pools, canonical, encode_examples,
    regbench_metrics, sample_automaton, sample_sequence,
)  # fmt: skip


@pytest.fixture(scope="module")
def pools():
    return automaton_pools(RegBenchConfig(train_automata=300, test_automata=100, seed=5))


def test_automata_follow_the_sampling_rules(pools):
    for a in pools[0] + pools[1] + pools[2]:
        assert 4 <= len(a) <= 12
        letters = {s for edges in a for s, _ in edges}
        assert len(letters) <= 18
        for q, edges in enumerate(a):
            symbols, targets = [s for s, _ in edges], [t for _, t in edges]
            assert 1 <= len(edges) <= 3
            assert len(set(symbols)) == len(symbols) and len(set(targets)) == len(targets)
            assert q not in targets  # no self-loops
        as_dicts = [dict(edges) for edges in a]
        assert _minimal_and_reachable(as_dicts) and canonical(as_dicts) == a


def test_pools_are_deduplicated_disjoint_and_deterministic(pools):
    train, test, validation = pools
    assert len(set(train)) == len(train) and len(set(test)) == len(test) and len(validation) == 200
    assert not set(train) & set(test) and not set(validation) & (set(train) | set(test))
    assert automaton_pools(RegBenchConfig(train_automata=300, test_automata=100, seed=5)) == pools
    # the train and test pools do not depend on the validation pool's size (earlier results stand)
    assert automaton_pools(RegBenchConfig(train_automata=300, test_automata=100, validation_automata=7, seed=5))[:2] == pools[:2]


def test_minimisation_rejects_equivalent_states():
    # states 1 and 2 both read 'a' back to 0 and nothing else: equivalent, so not minimal
    assert not _minimal_and_reachable([{0: 1, 1: 2}, {0: 0}, {0: 0}])
    assert not _minimal_and_reachable([{0: 1}, {0: 0}, {1: 0}])  # state 2 unreachable
    assert _minimal_and_reachable([{0: 1}, {1: 2}, {2: 0}])


def test_sequences_are_strings_of_the_automaton(pools):
    rng = np.random.default_rng(0)
    for a in pools[1][:30]:
        seq = sample_sequence(a, rng)
        strings = " ".join(map(str, seq)).split(f" {SEP} ")
        assert 10 <= len(strings) <= 19
        for s in strings:
            toks = [int(t) for t in s.split()]
            assert 1 <= len(toks) <= 49
            q = 0
            for t in toks:
                q = dict(a[q])[t - FIRST_LETTER]  # raises if the string leaves the automaton


def test_metrics_on_hand_made_cases(pools):
    x, y, automata = encode_examples(pools[1][:4], 128, seed=1)
    assert (y[x == PAD] == -100).all()  # no label on padding
    V = 20
    perfect = torch.full((4, 128, V), -1e4)
    for i, a in enumerate(automata):  # uniform over the valid letters: accuracy 1, TVD 0
        q = 0
        for t, tok in enumerate(x[i].tolist()):
            if tok == PAD:
                break
            q = 0 if tok == SEP else dict(a[q])[tok - FIRST_LETTER]
            for s, _ in a[q]:
                perfect[i, t, FIRST_LETTER + s] = 0.0
    m = regbench_metrics(perfect, x, automata)
    assert m["accuracy"] == 1.0 and m["tvd"] == pytest.approx(0.0, abs=1e-6)
    always_pad = torch.zeros(4, 128, V)
    always_pad[..., PAD] = 10.0
    assert regbench_metrics(always_pad, x, automata)["accuracy"] == 0.0


def test_sample_automaton_sizes_cover_the_range():
    rng = np.random.default_rng(1)
    sizes = {len(sample_automaton(rng, RegBenchConfig())) for _ in range(200)}
    assert min(sizes) == 4 and max(sizes) >= 10


@pytest.mark.slow
def test_a_tiny_regbench_run_validates_on_its_own_pool_and_evaluates(tmp_path):
    """The task end to end: training from the train pool, validation on the validation pool
    during training, `bla eval regbench` on the test pool."""
    import json
    import subprocess
    import sys

    from bla.launch.layout import fresh_process_env

    out = tmp_path / "rb"
    args = ["regbench", f"out_dir={out}", "steps=4", "eval_every=4", "save_every=4", "eval_batches=1", "micro_batch=4",
            "data.seq_len=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.bla.window=64",
            "model.bla.slots=16", "data.regbench.train_automata=40", "data.regbench.test_automata=12",
            "data.regbench.validation_automata=8", "optim.warmup_steps=1", "progress=false"]  # fmt: skip
    env = fresh_process_env(OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "bla.train.cli", *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and 0.0 <= summary["val_tvd"] <= 1.0 and summary["tokenizer"] is None
    score = subprocess.run([sys.executable, "-m", "bla.launch.cli", "eval", "regbench", "--run", str(out)],
                           capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert score.returncode == 0, score.stderr[-2000:]
    last = score.stdout.strip().splitlines()[-1].split()
    assert last[0] == "all" and 0.0 <= float(last[-2]) <= 1.0  # accuracy over the 12 test automata
