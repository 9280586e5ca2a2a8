"""lm-evaluation-harness adapter: the model class ``bla`` for our checkpoints and exports.

    bla eval harness --run runs/main --tasks swde,fda --limit 100 --batch_size 16 --output_path results/
    bla-lm-eval --model bla --model_args pretrained=runs/main --tasks lambada_openai   # lm_eval, with `bla` known

lm-eval finds models only among its own modules (0.4.x has no plugin entry point), so both
commands register ``bla`` and then hand over to lm-eval's own command line: every ``lm_eval``
flag works (``--batch_size``, ``--output_path``, ``--limit``, ``--num_fewshot``, ``--log_samples``,
...). ``python -m bla.eval.harness`` is the same as ``bla-lm-eval``.

Scoring is batched: requests that fit in the training context run ``batch_size`` at a time as
right-padded rows (a causal model's scores of a row do not depend on what follows it), longest
first; longer inputs are scored in windows of the context with the decode caches carried, as
for perplexity. Generation is batched too (prompts of any lengths, each at its own position),
greedy or sampled when the task asks, with the BLA state. The device defaults to the GPU when
there is one, else the CPU (also when lm-eval's default ``cuda`` is passed on a machine without
one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from bla.train.export import load_model

from .generate import generate


AUTO_BATCH_TOKENS = 65536  # batch_size=auto: as many rows as fit this many tokens of context


@register_model("bla")
class BLAHarnessLM(LM):
    def __init__(self, run: str = "", device: str = "", max_length: int = 0, batch_size: int | str = 1,
                 max_batch_size: int | None = None, pretrained: str = "", **unknown: object):  # fmt: skip
        """``run`` (ours) or ``pretrained`` (the harness's name for it, which then names the results):
        a run, checkpoint or export. ``max_batch_size`` is lm-eval's own (``auto`` batches here use a
        token budget); any other model argument is refused, not swallowed."""
        super().__init__()
        if unknown:
            raise ValueError(f"bla harness: unknown model_args {sorted(unknown)}; the model `bla` takes pretrained= (or "
                             f"run=), max_length=, device=, batch_size=")  # fmt: skip
        if bool(run) == bool(pretrained):
            raise ValueError("bla harness: name the model with exactly one of pretrained=PATH or run=PATH "
                             "(a run, checkpoint or bla export directory)")  # fmt: skip
        run = run or pretrained
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line passes device=cuda unless told otherwise: on a CPU machine, run there
            print(f"bla harness: device={device} asked but no GPU is available; running on the CPU", flush=True)
            device = "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tok, cfg = load_model(run, self._device)
        if self.tok is None:
            raise ValueError(f"{run} was trained on a synthetic task and has no tokenizer for text tasks")
        self.context = int(max_length) or (cfg.data.seq_len if cfg else 0)
        if self.context < 1:
            raise ValueError(f"{run} records no training context (a model re-saved without bla_export.json): "
                             f"pass --model_args run={run},max_length=N")  # fmt: skip
        self.batch_size = _batch_size(batch_size, self.context)

    @torch.no_grad()
    def _logprobs(self, ids: list[int], first: int) -> tuple[float, bool]:
        """Sum of log p(ids[i] | ids[:i]) for i >= first, and whether each was the argmax; in
        windows of the context with the caches carried."""
        x = torch.tensor(ids, device=self._device)[None]
        cache = self.model.new_cache(max_context=self.context)
        total, greedy = 0.0, True
        for start in range(0, x.shape[1] - 1, self.context):
            window = x[:, start : start + self.context + 1]
            out = self.model(window[:, :-1], cache=cache)
            cache = out.cache
            t, g = _score(out.logits[0], window[0, 1:], first - start - 1)  # targets from position first on
            total, greedy = total + t, greedy and g
        return total, greedy

    @torch.no_grad()
    def _logprobs_batch(self, batch: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """``_logprobs`` of requests that fit in one window, as one right-padded forward."""
        width = max(len(ids) for ids, _ in batch) - 1
        x = torch.full((len(batch), width + 1), self.tok.eos_id, dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            x[row, : len(ids)] = torch.tensor(ids)
        x = x.to(self._device)
        logits = self.model(x[:, :-1]).logits
        return [_score(logits[row, : len(ids) - 1], x[row, 1 : len(ids)], first - 1) for row, (ids, first) in enumerate(batch)]

    def _score_requests(self, items: list[tuple[list[int], int]], desc: str) -> list[tuple[float, bool]]:
        """Every (ids, first) scored: short ones batched longest first, long ones windowed."""
        out: list[tuple[float, bool] | None] = [None] * len(items)
        short = sorted((i for i, (ids, _) in enumerate(items) if len(ids) - 1 <= self.context), key=lambda i: -len(items[i][0]))
        long = [i for i, (ids, _) in enumerate(items) if len(ids) - 1 > self.context]
        bar = tqdm(total=len(items), desc=desc, disable=len(items) < 50)
        for a in range(0, len(short), self.batch_size):
            chunk = short[a : a + self.batch_size]
            for i, result in zip(chunk, self._logprobs_batch([items[i] for i in chunk])):
                out[i] = result
            bar.update(len(chunk))
        for i in long:
            out[i] = self._logprobs(*items[i])
            bar.update(1)
        bar.close()
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        items = []
        for req in requests:
            context, continuation = req.args
            ctx = [self.tok.bos_id, *self.tok.encode(context)]
            items.append((ctx + self.tok.encode(continuation), len(ctx)))
        return self._score_requests(items, "loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        items = [([self.tok.bos_id, *self.tok.encode(req.args[0])], 1) for req in requests]
        return [total for total, _ in self._score_requests(items, "loglikelihood_rolling")]

    def generate_until(self, requests) -> list[str]:
        """Requests with the same generation settings run ``batch_size`` at a time (each prompt at its
        own position: ``generate`` on a list); greedy unless the task asks to sample (seeded)."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            sample = kwargs.get("do_sample", False)
            key = (int(kwargs.get("max_gen_toks", 256)), float(kwargs.get("temperature", 1.0)) if sample else 0.0)
            groups.setdefault(key, []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=len(requests) < 50)
        for (max_new, temperature), rows in groups.items():
            for a in range(0, len(rows), self.batch_size):
                chunk = rows[a : a + self.batch_size]
                prompts = [[self.tok.bos_id, *self.tok.encode(requests[i].args[0])] for i in chunk]
                outs = generate(self.model, prompts, max_new, temperature=temperature, eos_id=self.tok.eos_id,
                                seed=0, device=self._device)  # fmt: skip
                for i, prompt, tokens in zip(chunk, prompts, outs):
                    until = (requests[i].args[1] or {}).get("until") or []
                    text = self.tok.decode(tokens[len(prompt) :])
                    for stop in [until] if isinstance(until, str) else until:
                        text = text.split(stop)[0]
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out


def _score(logits: torch.Tensor, targets: torch.Tensor, first: int) -> tuple[float, bool]:
    """Summed log-probability of ``targets[first:]`` under ``logits`` [T, vocab], and whether every
    one of them was the argmax (``first`` may be <= 0: all of them)."""
    logp = F.log_softmax(logits[max(first, 0) :].float(), dim=-1)
    targets = targets[max(first, 0) :]
    if targets.numel() == 0:
        return 0.0, True
    return float(logp.gather(1, targets[:, None]).sum()), bool((logp.argmax(-1) == targets).all())


def _batch_size(value: int | str, context: int) -> int:
    """lm-eval's ``--batch_size``: a number, or ``auto`` (rows of ``context`` in a fixed token budget)."""
    text = str(value).strip().lower()
    if text.startswith("auto"):
        return max(1, AUTO_BATCH_TOKENS // context)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"bla harness: batch_size must be a positive integer or 'auto', got {value!r}")
    return n


def run_tasks(run: str, tasks: list[str], include_path: str | None = None, limit: float | None = None,
              device: str = "", num_fewshot: int | None = None, batch_size: int | str = 1) -> dict:  # fmt: skip
    """Evaluate a checkpoint on harness tasks (names, or YAML tasks under ``include_path``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return simple_evaluate(model=BLAHarnessLM(run, device, batch_size=batch_size), tasks=tasks, task_manager=manager,
                           limit=limit, num_fewshot=num_fewshot, log_samples=False)  # fmt: skip


def lm_eval_main(argv: list[str]) -> int:
    """lm-eval's own command line (``lm_eval ARGS``) with the ``bla`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except ValueError as exc:  # bad model arguments or files: one line, as every bla command
        print(f"bla-lm-eval: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


def harness_argv(run: str, lm_eval_args: list[str]) -> list[str]:
    """``bla eval harness --run R ARGS``: lm-eval's ``run --model bla`` with ``run=R`` joined to any
    ``--model_args`` the user gave."""
    args, model_args = list(lm_eval_args), [f"run={run}"]
    for flag in ("--model_args", "--model-args"):
        while flag in args:
            i = args.index(flag)
            if i + 1 >= len(args):
                raise ValueError(f"{flag} needs a value (key=value,...)")
            model_args.append(args[i + 1])
            del args[i : i + 2]
    if "--model" in args:
        raise ValueError("bla eval harness runs the model `bla`; leave --model out (or use bla-lm-eval)")
    return ["run", "--model", "bla", "--model_args", ",".join(model_args), *args]


def main() -> None:
    import sys

    sys.exit(lm_eval_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
