"""Training tasks: what a run trains on and how it is scored, one module per task.

A task is registered by its module (``bla.data.text``: ``lm``; ``bla.data.synthetic``: ``mqar``;
``bla.data.regbench``: ``regbench``) into ``TASKS`` here, and owns everything about it: the checks of its settings,
its training and validation loaders, its validation metrics, and the seeds of its held-out
examples. The trainer, ``bla eval`` and ``bla sweep`` only ask a task by name
(``data.task``) through ``bla.data.tasks.task_named``, so adding one is one module (listed there)
plus its settings' field in the data config. This module imports none of its members: they
import it.

Validation is split so that distributed code stays out of tasks: ``eval_sums`` returns sums over
this rank's share of the held-out data (the trainer all-reduces each), ``eval_metrics`` turns
the summed values into the reported metrics.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Protocol

import torch

IGNORE = -100  # a label position without a target (torch's cross_entropy default)

# (loss, logits) of one batch of a task's eval loader: the trainer's forward, sequence parallel or not
Score = Callable[[dict], "tuple[torch.Tensor, torch.Tensor]"]


class Task(Protocol):
    name: str
    needs_text: bool  # trains on text sources through a tokenizer (and shards)

    def check(self, data: Any, model_vocab: int) -> list[str]: ...

    def train_loader(self, data: Any, micro_batch: int, rank: int, world: int, tokenizer=None, shards=None) -> Iterable[dict]: ...

    def eval_sums(self, score: Score, data: Any, micro_batch: int, batches: int, rank: int, world: int,
                  tokenizer=None) -> dict[str, float]: ...  # fmt: skip

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def test_scores(self, model, data: Any, device, **options) -> dict[str, float]: ...  # bla sweep's held-out test


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered already")
    TASKS[task.name] = task
    return task


def label_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore: int = IGNORE) -> torch.Tensor:
    """Per example, the share of labelled positions whose argmax is the label: [B] (EVAL.md's MQAR
    accuracy is its mean over examples). Examples without a label give NaN."""
    mask = labels != ignore
    hits = ((logits.argmax(-1) == labels) & mask).sum(-1).float()
    return hits / mask.sum(-1).float()


def loss_sums(score: Score, batches: Iterable[dict], accuracy: bool, tokenizer=None) -> dict[str, float]:
    """Summed token NLL and label count over ``batches``; with ``accuracy`` also the summed
    per-example label accuracy; with a ``tokenizer`` also the predicted text's UTF-8 bytes."""
    sums = {"nll": 0.0, "tokens": 0.0, "correct": 0.0, "examples": 0.0, "bytes": 0.0}
    for batch in batches:
        loss, logits = score(batch)
        labels = batch["labels"]  # the whole row's: sequence-parallel ranks score their group's mean
        n = float((labels != IGNORE).sum())
        sums["nll"] += float(loss) * n
        sums["tokens"] += n
        if accuracy:
            acc = label_accuracy(logits, labels.to(logits.device))
            sums["correct"] += float(acc.nansum())
            sums["examples"] += float((~acc.isnan()).sum())
        if tokenizer is not None:  # special tokens decode to no bytes
            sums["bytes"] += len(tokenizer.decode(labels[labels != IGNORE].tolist()).encode("utf-8"))
    return sums


def loss_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Validation loss (nats per labelled token) and perplexity from ``loss_sums``."""
    loss = sums["nll"] / max(sums["tokens"], 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
