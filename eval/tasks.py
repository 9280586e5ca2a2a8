"""Metrics of the recall tasks."""

from __future__ import annotations

import torch


def label_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """Per example, the share of labelled positions whose argmax is the label: [B] (EVAL.md's MQAR
    accuracy is its mean over examples). Examples without a label give NaN."""
    mask = labels != ignore
    hits = ((logits.argmax(-1) == labels) & mask).sum(-1).float()
    return hits / mask.sum(-1).float()


@torch.no_grad()
def mqar_accuracy(model, seq_len: int, mqar_cfg, examples: int, seed: int, batch: int, device) -> float:
    """EVAL.md's MQAR accuracy on ``examples`` held-out examples (seeds apart from training's)."""
    from bla.data.synthetic import mqar_examples

    correct = []
    for start in range(0, examples, batch):
        x, y = mqar_examples(min(batch, examples - start), seq_len, mqar_cfg, seed + start)
        correct.append(label_accuracy(model(x.to(device)).logits, y.to(device)).cpu())
    return float(torch.cat(correct).mean())


@torch.no_grad()
def regbench_scores(model, seq_len: int, regbench_cfg, seed: int, device, batch: int = 32) -> dict[int, dict]:
    """RegBench accuracy and TV distance on the held-out automata, per number of states, plus
    ``"all"`` (weighted by positions)."""
    from bla.data import regbench

    by_size: dict[int, list] = {}
    for a in regbench.cached_pools(regbench_cfg)[1]:  # one generation per process: a sweep evaluates many runs
        by_size.setdefault(len(a), []).append(a)
    scores, total = {}, {"accuracy": 0.0, "tvd": 0.0, "positions": 0.0}
    for size in sorted(by_size):
        x, _, automata = regbench.encode_examples(by_size[size], seq_len, seed=seed)
        logits = torch.cat([model(x[i : i + batch].to(device)).logits.float().cpu() for i in range(0, len(x), batch)])
        m = regbench.regbench_metrics(logits, x, automata)
        scores[size] = {**m, "automata": len(automata)}
        for k in ("accuracy", "tvd"):
            total[k] += m[k] * m["positions"]
        total["positions"] += m["positions"]
    n = max(total["positions"], 1.0)
    scores["all"] = {"accuracy": total["accuracy"] / n, "tvd": total["tvd"] / n, "positions": total["positions"]}
    return scores
