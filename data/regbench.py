"""RegBench: in-context language learning on random finite automata (Akyurek et al. 2024; the
procedure of ../shared/spec/EVAL.md).

Tokens: pad = 0, separator ``|`` = 1, the 18 letters = 2..19 (a vocabulary of 20).
Each example is a fresh probabilistic automaton: 4-12 states, an alphabet of 4-18 letters,
every state with 1-3 outgoing edges (distinct symbols, distinct targets, no self-loops), all
states accepting, start state 0, minimal (an automaton that minimisation would shrink, or with
unreachable states, is redrawn), transitions uniform over a state's edges. Automata are
deduplicated by a canonical form, and the train, test and validation pools are disjoint. One
sequence per automaton: 10-19 strings of length 1-49 sampled from it, joined by separators.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .synthetic import TaskLoader
from .task import IGNORE, register_task

PAD, SEP, FIRST_LETTER, NUM_LETTERS = 0, 1, 2, 18
VOCAB = FIRST_LETTER + NUM_LETTERS

Automaton = tuple[tuple[tuple[int, int], ...], ...]  # per state: sorted (symbol, target) edges


@dataclass(frozen=True)
class RegBenchConfig:
    train_automata: int = 1000  # size of the training pool (the swept quantity: 1k to 40k)
    test_automata: int = 500
    validation_automata: int = 200  # validation during training (and learning-rate choice): a third pool
    min_states: int = 4
    max_states: int = 12
    min_alphabet: int = 4
    max_alphabet: int = NUM_LETTERS
    seed: int = 0


def _minimal_and_reachable(edges: list[dict[int, int]]) -> bool:
    """Moore's partition refinement with a dead state for missing transitions (all states accept)."""
    n = len(edges)
    seen, stack = {0}, [0]
    while stack:
        for t in edges[stack.pop()].values():
            if t not in seen:
                seen.add(t)
                stack.append(t)
    if len(seen) != n:
        return False
    symbols = sorted({s for e in edges for s in e})
    block = [0] * n + [1]  # state n is the dead state (non-accepting)
    while True:
        sig = [(block[q], tuple(block[edges[q].get(s, n)] if q < n else block[n] for s in symbols)) for q in range(n + 1)]
        ids = {s: i for i, s in enumerate(dict.fromkeys(sig))}
        new = [ids[s] for s in sig]
        if len(set(new)) == len(set(block)):
            return len(set(new[:n])) == n
        block = new


def canonical(edges: list[dict[int, int]]) -> Automaton:
    """States renumbered in BFS order from the start, edges by symbol: equal automata, equal keys."""
    order, queue = {0: 0}, [0]
    while queue:
        q = queue.pop(0)
        for s in sorted(edges[q]):
            t = edges[q][s]
            if t not in order:
                order[t] = len(order)
                queue.append(t)
    inv = sorted(order, key=order.get)
    return tuple(tuple(sorted((s, order[t]) for s, t in edges[q].items())) for q in inv)


def sample_automaton(rng: np.random.Generator, cfg: RegBenchConfig) -> Automaton:
    while True:
        n = int(rng.integers(cfg.min_states, cfg.max_states + 1))
        k = int(rng.integers(cfg.min_alphabet, cfg.max_alphabet + 1))
        alphabet = rng.choice(NUM_LETTERS, size=k, replace=False)
        edges = []
        for q in range(n):
            m = int(rng.integers(1, min(3, n - 1, k) + 1))
            targets = rng.choice([t for t in range(n) if t != q], size=m, replace=False)
            symbols = rng.choice(alphabet, size=m, replace=False)
            edges.append({int(s): int(t) for s, t in zip(symbols, targets)})
        if _minimal_and_reachable(edges):
            return canonical(edges)


def automaton_pools(cfg: RegBenchConfig) -> tuple[list[Automaton], list[Automaton], list[Automaton]]:
    """Deduplicated, disjoint train, test and validation pools, deterministic by seed (drawn in
    that order, so the train and test pools do not depend on the validation pool's size)."""
    rng = np.random.default_rng(cfg.seed)
    seen: set[Automaton] = set()
    pools: list[list[Automaton]] = [[], [], []]
    for pool, size in zip(pools, (cfg.train_automata, cfg.test_automata, cfg.validation_automata)):
        while len(pool) < size:
            a = sample_automaton(rng, cfg)
            if a not in seen:
                seen.add(a)
                pool.append(a)
    return pools[0], pools[1], pools[2]


def sample_sequence(a: Automaton, rng: np.random.Generator) -> list[int]:
    """10-19 strings of length 1-49 from the automaton, joined by separators (token ids)."""
    out: list[int] = []
    for i in range(int(rng.integers(10, 20))):
        if i:
            out.append(SEP)
        q = 0
        for _ in range(int(rng.integers(1, 50))):
            s, q = a[q][int(rng.integers(len(a[q])))]
            out.append(FIRST_LETTER + s)
    return out


_POOLS_LOCK = threading.Lock()


def cached_pools(cfg: RegBenchConfig) -> tuple[list[Automaton], list[Automaton], list[Automaton]]:
    """``automaton_pools`` once per process, also when threads ask at once (``bla sweep --jobs``
    evaluates its finished runs in threads)."""
    with _POOLS_LOCK:
        return _cached_pools(cfg)


@functools.lru_cache(maxsize=4)
def _cached_pools(cfg: RegBenchConfig) -> tuple[list[Automaton], list[Automaton], list[Automaton]]:
    return automaton_pools(cfg)


def training_batch(n: int, seq_len: int, cfg: RegBenchConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of automata drawn from the training pool (a TaskLoader ``make``)."""
    pool = cached_pools(cfg)[0]
    rng = np.random.default_rng(seed)
    picks = [pool[int(i)] for i in rng.integers(len(pool), size=n)]
    inputs, labels, _ = encode_examples(picks, seq_len, seed)
    return inputs, labels


def encode_examples(automata: list[Automaton], seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Inputs/labels [n, seq_len] (padded or cut; every next token is a label) and the automata."""
    rng = np.random.default_rng(seed)
    inputs = torch.full((len(automata), seq_len), PAD, dtype=torch.long)
    labels = torch.full((len(automata), seq_len), IGNORE, dtype=torch.long)
    for i, a in enumerate(automata):
        seq = sample_sequence(a, rng)[: seq_len + 1]
        inputs[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        labels[i, : len(seq) - 1] = torch.tensor(seq[1:])
    return inputs, labels, automata


def valid_next(a: Automaton, tokens: list[int]) -> list[set[int]]:
    """After each token, the tokens that keep the current string valid (its edges, or the separator)."""
    out, q = [], 0
    for tok in tokens:
        if tok == SEP:
            q = 0
        elif tok >= FIRST_LETTER:
            q = dict(a[q]).get(tok - FIRST_LETTER, -1)
            if q < 0:
                raise ValueError("token sequence leaves the automaton")
        out.append({FIRST_LETTER + s for s, _ in a[q]} | {SEP} if tok != PAD else set())
    return out


def regbench_metrics(logits: torch.Tensor, inputs: torch.Tensor, automata: list[Automaton]) -> dict:
    """Accuracy: share of positions (inside the sequences) whose argmax keeps the string valid.
    TVD: total variation between the model's next-letter distribution (letters only,
    renormalised) and the automaton's (uniform over the state's edges), averaged over positions."""
    hits = tvd = count = 0.0
    probs = logits.float().softmax(-1)
    for i, a in enumerate(automata):
        toks = [int(t) for t in inputs[i] if t != PAD]
        allowed = valid_next(a, toks)
        for t, ok in enumerate(allowed):
            hits += int(probs[i, t].argmax()) in ok
            letters = probs[i, t, FIRST_LETTER:]
            letters = letters / letters.sum()
            true = torch.zeros_like(letters)
            edges = [s for s in ok if s != SEP]
            true[[s - FIRST_LETTER for s in edges]] = 1.0 / len(edges)
            tvd += 0.5 * float((letters - true).abs().sum())
            count += 1
    return {"accuracy": hits / max(count, 1), "tvd": tvd / max(count, 1), "positions": int(count)}


def _add_weighted(sums: dict, m: dict) -> None:
    """Accumulate ``regbench_metrics`` weighted by their positions."""
    for k in ("accuracy", "tvd"):
        sums[k] += m[k] * m["positions"]
    sums["positions"] += m["positions"]


class RegBenchTask:
    """Training sequences from the training pool, validation on the validation pool, the final
    test on the test pool: three disjoint pools of automata."""

    name, needs_text = "regbench", False
    validation_seed = 1_000_003  # the strings sampled from the validation automata
    test_seed = 11  # the final evaluation's strings (bla eval regbench, bla sweep)

    def check(self, data, model_vocab: int) -> list[str]:
        return [f"RegBench needs model.vocab_size >= {VOCAB}, got {model_vocab}"] if model_vocab < VOCAB else []

    def train_loader(self, data, micro_batch, rank, world, tokenizer=None, shards=None):
        make = lambda n, seed: training_batch(n, data.seq_len, data.regbench, seed)  # noqa: E731
        return TaskLoader(make, micro_batch, data.seed, rank, world)

    def eval_sums(self, score, data, micro_batch, batches, rank, world, tokenizer=None):
        """Accuracy and TV distance on the validation automata, split across ranks."""
        held_out = cached_pools(data.regbench)[2][rank::world]
        sums = {"accuracy": 0.0, "tvd": 0.0, "positions": 0.0}
        for b in range(batches):
            chunk = held_out[b * micro_batch : (b + 1) * micro_batch] or held_out[:micro_batch]
            x, labels, automata = encode_examples(chunk, data.seq_len, seed=self.validation_seed + b)
            _, logits = score({"input_ids": x, "labels": labels})
            _add_weighted(sums, regbench_metrics(logits, x, automata))
        return sums

    def eval_metrics(self, sums):
        n = max(sums["positions"], 1.0)
        return {"val_accuracy": sums["accuracy"] / n, "val_tvd": sums["tvd"] / n}

    def test_scores(self, model, data, device, seed: int | None = None) -> dict:
        scores = regbench_scores(model, data.seq_len, data.regbench, self.test_seed if seed is None else seed, device)
        return {"accuracy": scores["all"]["accuracy"], "tvd": scores["all"]["tvd"]}


@torch.no_grad()
def regbench_scores(model, seq_len: int, regbench_cfg: RegBenchConfig, seed: int, device, batch: int = 32) -> dict:
    """RegBench accuracy and TV distance on the held-out automata, per number of states, plus
    ``"all"`` (weighted by positions)."""
    by_size: dict[int, list] = {}
    for a in cached_pools(regbench_cfg)[1]:  # one generation per process: a sweep evaluates many runs
        by_size.setdefault(len(a), []).append(a)
    scores, total = {}, {"accuracy": 0.0, "tvd": 0.0, "positions": 0.0}
    for size in sorted(by_size):
        x, _, automata = encode_examples(by_size[size], seq_len, seed=seed)
        logits = torch.cat([model(x[i : i + batch].to(device)).logits.float().cpu() for i in range(0, len(x), batch)])
        m = regbench_metrics(logits, x, automata)
        scores[size] = {**m, "automata": len(automata)}
        _add_weighted(total, m)
    n = max(total["positions"], 1.0)
    scores["all"] = {"accuracy": total["accuracy"] / n, "tvd": total["tvd"] / n, "positions": total["positions"]}
    return scores


REGBENCH = register_task(RegBenchTask())
