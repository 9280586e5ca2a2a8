"""``bla eval perplexity|mqar|regbench|harness|memory`` and ``bla generate``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch


def _device(name: str) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_arg(name: str) -> str:
    """--device: a device torch knows and this machine has (checked before a model is loaded)."""
    if not name:  # the default: cuda if there is one
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise argparse.ArgumentTypeError(f"{name}: no CUDA device here (torch {torch.__version__} is {build}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{name!r}: expected cpu, cuda or cuda:N")
    return name


def _int_at_least(lowest: int, what: str):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return check


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text}")
    return value


def _perplexity(args) -> int:
    from bla.data import DataSourceConfig, parse_source
    from bla.train.export import load_model

    from .perplexity import perplexity

    device = _device(args.device)
    model, tok, cfg = load_model(args.run, device)
    # none recorded: a model re-saved by transformers (no bla_export.json)
    sources = args.source or (cfg.data.val_sources if cfg else None)
    context = args.context or (cfg.data.seq_len if cfg else None)  # by default the training context
    if not sources or context is None:
        raise ValueError(f"{args.run} records no training data settings (a model re-saved without bla_export.json): "
                         f"pass --source (e.g. stdlib:validation) and --context")  # fmt: skip
    source = DataSourceConfig([parse_source(s) for s in sources])
    result = perplexity(model, tok, source, context, args.max_docs, device, progress=True)
    for row in result["loss_by_position"]:  # a table on stderr; stdout holds the JSON alone
        print(f"positions {row['from']:>6}-{row['to'] - 1:<6} {row['tokens']:>9,} tokens  loss {row['loss']:.4f}", file=sys.stderr)
    print(json.dumps({**result, "context": context, "run": str(args.run)}, indent=1))
    return 0


def _task_run(args, task: str):
    """The model and data config of a run trained on ``task``."""
    from bla.train.export import load_model

    model, _, cfg = load_model(args.run, _device(args.device))
    if cfg is None or cfg.data.task != task:
        raise ValueError(f"{args.run} was not trained on {task} (data.task={cfg.data.task if cfg else 'not recorded'})")
    return model, cfg.data


def _mqar(args) -> int:
    from bla.data.synthetic import MQAR, mqar_accuracy

    model, data = _task_run(args, "mqar")
    seq_len = args.seq_len or data.seq_len
    seed = MQAR.test_seed if args.seed is None else args.seed
    print(f"{'K':>4} {'L':>6} {'examples':>9} {'accuracy':>9}")
    for K in args.num_kv_pairs or [data.mqar.num_kv_pairs]:
        mqar = dataclasses.replace(data.mqar, num_kv_pairs=K)
        acc = mqar_accuracy(model, seq_len, mqar, args.examples, seed, args.batch, _device(args.device))
        print(f"{K:>4} {seq_len:>6} {args.examples:>9} {acc:>9.4f}")
    return 0


def _regbench(args) -> int:
    from bla.data.regbench import REGBENCH, regbench_scores

    model, data = _task_run(args, "regbench")
    seed = REGBENCH.test_seed if args.seed is None else args.seed
    scores = regbench_scores(model, data.seq_len, data.regbench, seed, _device(args.device))
    print(f"{'states':>6} {'automata':>8} {'accuracy':>9} {'tvd':>7}")
    for size, m in scores.items():
        print(f"{size:>6} {m.get('automata', ''):>8} {m['accuracy']:>9.4f} {m['tvd']:>7.4f}")
    return 0


def _harness(args) -> int:
    from .harness import harness_argv, lm_eval_main

    return lm_eval_main(harness_argv(args.run, args.extra))


def _generate(args) -> int:
    from bla.train.export import load_model

    from .generate import generate

    device = _device(args.device)
    model, tok, _ = load_model(args.run, device)
    if tok is None:
        raise ValueError(f"{args.run} was trained on a task without text: it has no tokenizer to generate with")
    prompts = [[tok.bos_id, *tok.encode(p)] for p in args.prompt]  # <bos> first, as in training
    outs = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, tok.eos_id,
                    args.seed, device)  # fmt: skip
    for text, ids, out in zip(args.prompt, prompts, outs):
        print(text + tok.decode(out[len(ids) :]))
    return 0


def add_eval_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoints and models")
    esub = p.add_subparsers(dest="eval_command", required=True)

    ppl = esub.add_parser("perplexity", help="token loss, perplexity and bits per byte on held-out text")
    ppl.add_argument("--run", required=True, help="run, checkpoint or exported (bla export) directory")
    ppl.add_argument("--source", action="append", help="data source (default: the run's validation sources)")
    ppl.add_argument("--context", type=positive_int, default=None, help="window of the scoring passes (default: training seq_len)")
    ppl.add_argument("--max-docs", type=positive_int, default=None)
    ppl.add_argument("--device", type=device_arg, default="", help="cpu, cuda or cuda:N (default: cuda if there is one)")
    ppl.set_defaults(func=_perplexity)

    mq = esub.add_parser("mqar", help="MQAR accuracy per number of key-value pairs on held-out examples")
    mq.add_argument("--run", required=True)
    mq.add_argument("--num-kv-pairs", type=positive_int, nargs="+")
    mq.add_argument("--seq-len", type=positive_int, default=None, help="default: the training seq_len")
    mq.add_argument("--examples", type=positive_int, default=3000)
    mq.add_argument("--batch", type=positive_int, default=250)
    mq.add_argument("--seed", type=int, default=None, help="held-out examples (default: the task's test seed)")
    mq.add_argument("--device", type=device_arg, default="", help="cpu, cuda or cuda:N (default: cuda if there is one)")
    mq.set_defaults(func=_mqar)

    rb = esub.add_parser("regbench", help="RegBench accuracy and TV distance per automaton size (held-out automata)")
    rb.add_argument("--run", required=True)
    rb.add_argument("--seed", type=int, default=None, help="held-out strings (default: the task's test seed)")
    rb.add_argument("--device", type=device_arg, default="", help="cpu, cuda or cuda:N (default: cuda if there is one)")
    rb.set_defaults(func=_regbench)

    hn = esub.add_parser("harness", help="lm-evaluation-harness tasks (the model class `bla`); other flags are lm-eval's own",
                         description="Runs lm-eval with --model bla --model_args run=RUN; every other flag goes to "
                                     "lm-eval as typed: --tasks, --include_path, --limit, --num_fewshot, --batch_size, "
                                     "--output_path, --device, --log_samples, --model_args max_length=N, ...")  # fmt: skip
    hn.add_argument("--run", required=True, help="run, checkpoint or exported (bla export) directory")
    hn.set_defaults(func=_harness, takes_extra=True)

    mem = esub.add_parser("memory", help="prefill/decode latency and memory against context: table, JSON and PNG")
    from .memory import add_arguments
    from .memory import run as run_memory

    add_arguments(mem)

    mem.set_defaults(func=run_memory)

    g = sub.add_parser("generate", help="generate text from a checkpoint (constant-size BLA state)")
    g.add_argument("--run", required=True)
    g.add_argument("--prompt", required=True, action="append", help="repeat for several prompts: generated as one batch")
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=non_negative_int, default=0, help="0 = no top-k cut")
    g.add_argument("--top-p", type=probability, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", type=device_arg, default="", help="cpu, cuda or cuda:N (default: cuda if there is one)")
    g.set_defaults(func=_generate)
