"""lm-evaluation-harness adapter: the model class ``bla`` for our checkpoints.

    bla eval harness --run runs/main --tasks swde,fda --limit 100
    python -m bla.eval.harness --model bla --model_args run=runs/main --tasks lambada_openai

(lm-eval discovers models only among its own modules; ``python -m bla.eval.harness`` registers
``bla`` and hands over to lm-eval's command line, so every ``lm_eval`` option works.)
Long inputs are scored in windows of the training context with the decode caches carried, as
for perplexity; generation is greedy (or sampled when the task asks) with the BLA state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .generate import generate
from .load import load_model


@register_model("bla")
class BLAHarnessLM(LM):
    def __init__(self, run: str, device: str = "", max_length: int = 0, **_: object):
        super().__init__()
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line passes device=cuda unless told otherwise: on a CPU machine, run there
            print(f"bla harness: device={device} asked but no GPU is available; running on the CPU", flush=True)
            device = "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tok, cfg = load_model(run, self._device)
        if self.tok is None:
            raise ValueError(f"{run} was trained on a synthetic task and has no tokenizer for text tasks")
        self.context = int(max_length) or cfg["data"]["seq_len"]

    @torch.no_grad()
    def _logprobs(self, ids: list[int], first: int) -> tuple[float, bool]:
        """Sum of log p(ids[i] | ids[:i]) for i >= first, and whether each was the argmax."""
        x = torch.tensor(ids, device=self._device)[None]
        cache = self.model.new_cache(max_context=self.context)
        total, greedy = 0.0, True
        for start in range(0, x.shape[1] - 1, self.context):
            window = x[:, start : start + self.context + 1]
            out = self.model(window[:, :-1], cache=cache)
            cache = out.cache
            logp = F.log_softmax(out.logits[0].float(), dim=-1)
            targets = window[0, 1:]
            pos = torch.arange(start + 1, start + window.shape[1], device=self._device)
            keep = pos >= first
            if keep.any():
                total += float(logp[keep].gather(1, targets[keep, None]).sum())
                greedy &= bool((logp[keep].argmax(-1) == targets[keep]).all())
        return total, greedy

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=len(requests) < 50):
            context, continuation = req.args
            ctx = [self.tok.bos_id, *self.tok.encode(context)]
            out.append(self._logprobs(ctx + self.tok.encode(continuation), first=len(ctx)))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [self._logprobs([self.tok.bos_id, *self.tok.encode(req.args[0])], first=1)[0] for req in requests]

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in tqdm(requests, desc="generate_until", disable=len(requests) < 50):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = torch.tensor([[self.tok.bos_id, *self.tok.encode(context)]], device=self._device)
            sample = kwargs.get("do_sample", False)
            tokens = generate(self.model, ids, int(kwargs.get("max_gen_toks", 256)),
                              temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                              eos_id=self.tok.eos_id, seed=0)  # fmt: skip
            text = self.tok.decode(tokens[0, ids.shape[1] :].tolist())
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def run_tasks(run: str, tasks: list[str], include_path: str | None = None, limit: float | None = None,
              device: str = "", num_fewshot: int | None = None) -> dict:  # fmt: skip
    """Evaluate a checkpoint on harness tasks (names, or YAML tasks under ``include_path``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return simple_evaluate(model=BLAHarnessLM(run, device), tasks=tasks, task_manager=manager, limit=limit,
                           num_fewshot=num_fewshot, log_samples=False)  # fmt: skip


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
