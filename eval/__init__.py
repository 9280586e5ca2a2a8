"""Evaluation: perplexity (``perplexity``), recall tasks (``tasks``), long-context memory use
(``memory``), generation (``generate``), loading checkpoints (``load``). Submodules are imported
where used, so ``python -m bla.eval.memory`` runs without the data stack."""
