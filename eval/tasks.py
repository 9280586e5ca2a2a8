"""Metrics of the recall tasks."""

from __future__ import annotations

import torch


def label_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """Per example, the share of labelled positions whose argmax is the label: [B] (EVAL.md's MQAR
    accuracy is its mean over examples). Examples without a label give NaN."""
    mask = labels != ignore
    hits = ((logits.argmax(-1) == labels) & mask).sum(-1).float()
    return hits / mask.sum(-1).float()
