"""Synthetic recall tasks as training and evaluation data (procedures of ../shared/spec/EVAL.md).

MQAR (multi-query associative recall, Zoology): keys from [1, V/2), values from [V/2, V),
drawn without replacement inside an example; ``k1 v1 ... kK vK`` first, then each key queried
once at position ``2K + 2 gap`` with gaps drawn without replacement from ``range(space)``,
``space = (L - 2K) / 2``, with probability proportional to ``a * (i + 1) ** (a - 1)``; the value
is the label at the query; every other label is -100. Filler is 0 or random ids.
``placement=spread`` (an issue 19 ablation, not Zoology's) puts pair i at ``2 i L / 4K`` (evenly
over the first half) and the queries in the second half: with W = L, the pairs then reach every
slot's share of the window instead of the first 2K / W of it.

Batches are deterministic functions of (seed, batch index), so a task loader resumes exactly.
The task ``mqar`` (``bla.data.task``) is registered here: its checks, loaders, validation and
held-out test accuracy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .task import IGNORE, label_accuracy, loss_metrics, loss_sums, register_task


@dataclass
class MQARConfig:
    num_kv_pairs: int = 4  # K
    vocab_size: int = 8192  # V
    power_a: float = 0.01  # gap distribution exponent
    random_filler: bool = False
    placement: str = "start"  # start (Zoology: the K pairs first) | spread (pairs evenly over the first half, queries in the second)

    def check(self, seq_len: int) -> None:
        K, V, L = self.num_kv_pairs, self.vocab_size, seq_len
        if L % 2 or 4 * K > L or V <= L or K > V // 2 - 1:
            raise ValueError(f"MQAR needs an even L with 4K <= L < V and K < V/2 - 1; got L={L}, K={K}, V={V}")
        if self.placement not in ("start", "spread"):
            raise ValueError(f"mqar.placement must be start or spread, got {self.placement!r}")
        if self.placement == "spread" and L % 4:
            raise ValueError(f"mqar.placement=spread needs L divisible by 4, got L={L}")


def mqar_examples(n: int, seq_len: int, cfg: MQARConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples: inputs [n, L] and labels [n, L] (int64)."""
    cfg.check(seq_len)
    rng = np.random.default_rng(seed)
    K, V, L, a = cfg.num_kv_pairs, cfg.vocab_size, seq_len, cfg.power_a
    keys = np.stack([rng.choice(np.arange(1, V // 2), size=K, replace=False) for _ in range(n)])
    values = np.stack([rng.choice(np.arange(V // 2, V), size=K, replace=False) for _ in range(n)])
    if cfg.placement == "start":  # pairs at 0..2K, queries after them
        pair_at, first_query, space = 2 * np.arange(K), 2 * K, (L - 2 * K) // 2
    else:  # pair i at 2 i s (s = L / 4K): spread over the first half; queries in the second half
        pair_at, first_query, space = 2 * np.arange(K) * (L // (4 * K)), L // 2, L // 4
    p = a * np.arange(1, space + 1, dtype=np.float64) ** (a - 1)
    p /= p.sum()
    gaps = np.stack([rng.choice(space, size=K, replace=False, p=p) for _ in range(n)])
    x = np.zeros((n, L + 1), dtype=np.int64)
    x[:, pair_at], x[:, pair_at + 1] = keys, values
    rows = np.arange(n)[:, None]
    x[rows, first_query + 2 * gaps] = keys
    labels_full = np.full((n, L + 1), IGNORE, dtype=np.int64)
    labels_full[rows, first_query + 2 * gaps + 1] = values
    inputs, labels = torch.from_numpy(x[:, :-1].copy()), torch.from_numpy(labels_full[:, 1:].copy())
    if cfg.random_filler:
        filler = inputs == 0
        inputs[filler] = torch.from_numpy(rng.integers(1, V, size=int(filler.sum())))
    return inputs, labels


class TaskLoader:
    """Endless batches of a synthetic task for one rank; ``state_dict`` is the next batch index."""

    def __init__(self, make, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.make, self.batch_size, self.seed = make, batch_size, seed
        self.rank, self.world_size, self.next_batch = rank, world_size, 0

    def __iter__(self):
        while True:
            index = self.next_batch * self.world_size + self.rank
            inputs, labels = self.make(self.batch_size, int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
            self.next_batch += 1
            yield {"input_ids": inputs, "labels": labels}

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch, "world_size": self.world_size}

    def load_state_dict(self, sd: dict) -> None:
        # a different world size re-splits the stream from the earliest unfinished batch
        self.next_batch = sd["next_batch"] * sd["world_size"] // self.world_size


class MQARTask:
    name, needs_text = "mqar", False
    validation_seed = 1_000_003  # validation examples: another seed stream than training's
    test_seed = 7_000_001  # the final evaluation's held-out examples (bla eval mqar, bla sweep)

    def check(self, data, model_vocab: int) -> list[str]:
        try:
            data.mqar.check(data.seq_len)
        except ValueError as exc:
            return [str(exc)]
        if data.mqar.vocab_size > model_vocab:
            return [f"data.mqar.vocab_size={data.mqar.vocab_size} exceeds model.vocab_size={model_vocab}"]
        return []

    def _loader(self, data, micro_batch: int, seed: int, rank: int, world: int) -> TaskLoader:
        return TaskLoader(lambda n, s: mqar_examples(n, data.seq_len, data.mqar, s), micro_batch, seed, rank, world)

    def train_loader(self, data, micro_batch, rank, world, tokenizer=None, shards=None):
        return self._loader(data, micro_batch, data.seed, rank, world)

    def eval_sums(self, score, data, micro_batch, batches, rank, world, tokenizer=None):
        held_out = self._loader(data, micro_batch, data.seed + self.validation_seed, rank, world)
        return loss_sums(score, itertools.islice(held_out, batches), accuracy=True)

    def eval_metrics(self, sums):
        return {**loss_metrics(sums), "val_accuracy": sums["correct"] / max(sums["examples"], 1.0)}

    def test_scores(self, model, data, device, examples: int = 1000, batch: int = 250, seed: int | None = None) -> dict:
        """EVAL.md's MQAR accuracy on held-out examples (``test_seed`` unless given)."""
        seed = self.test_seed if seed is None else seed
        return {"accuracy": mqar_accuracy(model, data.seq_len, data.mqar, examples, seed, batch, device)}


@torch.no_grad()
def mqar_accuracy(model, seq_len: int, mqar_cfg: MQARConfig, examples: int, seed: int, batch: int, device) -> float:
    """EVAL.md's MQAR accuracy on ``examples`` examples of ``seed`` (keep it apart from training's)."""
    correct = []
    for start in range(0, examples, batch):
        x, y = mqar_examples(min(batch, examples - start), seq_len, mqar_cfg, seed + start)
        correct.append(label_accuracy(model(x.to(device)).logits, y.to(device)).cpu())
    return float(torch.cat(correct).mean())


MQAR = register_task(MQARTask())
