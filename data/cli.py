"""``bla data ...``: train tokenizers, pre-tokenise shards, measure throughput."""

from __future__ import annotations

import itertools
import json
import platform
import time

from bla import data  # its modules (datasets, tokenizers) load when a command runs, not with the CLI


def _source(args) -> data.DataSourceConfig:
    return data.DataSourceConfig([data.parse_source(s) for s in (args.source or ["stdlib"])], seed=args.seed,
                                 mixture=args.mixture)  # fmt: skip


def _train_tokenizer(args) -> int:
    docs = (ex["text"] for ex in itertools.islice(data.load_documents(_source(args)), args.max_docs))
    t0 = time.perf_counter()
    tok = data.train_tokenizer(docs, args.out, kind=args.kind, vocab_size=args.vocab_size, model_type=args.model_type,
                               progress=True)  # fmt: skip
    print(f"trained a {tok.kind} tokenizer of {tok.vocab_size} tokens in {time.perf_counter() - t0:.1f} s: {tok.path}")
    return 0


def _prepare(args) -> int:
    tok = data.Tokenizer(args.tokenizer)
    m = data.prepare(_source(args), tok, args.out, shard_tokens=args.shard_tokens, max_docs=args.max_docs)
    print(f"{m['docs']} documents, {m['tokens']} tokens ({m['dtype']}) in {len(m['shards'])} shard(s) under {args.out}; "
          f"{m['tokens_per_second']:,.0f} tokens/s")  # fmt: skip
    return 0


def _bench(args) -> int:
    """Tokenisation throughput and shard-loader throughput, as a table and JSON."""
    tok = data.Tokenizer(args.tokenizer)
    src = _source(args)
    texts = [ex["text"] for ex in itertools.islice(data.load_documents(src), args.max_docs)]
    t0 = time.perf_counter()
    n_tok = sum(len(ids) for ids in tok.encode_batch(texts))
    tok_s = n_tok / (time.perf_counter() - t0)
    cfg = data.LoaderConfig(seq_len=args.seq_len, batch_size=args.batch_size, loop=True)
    loader = iter(data.build_loader(cfg, tok, shards=args.shards))
    next(loader)  # open the memory maps
    t0 = time.perf_counter()
    n_batches = 0
    while time.perf_counter() - t0 < args.seconds:
        next(loader)
        n_batches += 1
    load_s = n_batches * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
    rows = [
        {"what": f"tokenise ({tok.kind}, vocab {tok.vocab_size}, 1 process, batch encode)", "tokens_per_s": tok_s},
        {"what": f"shard loader (seq_len {cfg.seq_len}, batch {cfg.batch_size}, 0 workers)", "tokens_per_s": load_s},
    ]
    for r in rows:
        print(f"{r['what']:<70} {r['tokens_per_s']:>14,.0f} tokens/s")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "processor": platform.processor()}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


def add_data_commands(sub) -> None:
    p = sub.add_parser("data", help="tokenizers, shards, loaders")
    dsub = p.add_subparsers(dest="data_command", required=True)

    def common(q):
        q.add_argument("--source", action="append", help="stdlib[:split] | files:<glob>[#field] | "
                       "hub:<name>[@config][:split][#field], weighted as <w>*<source> (repeatable)")  # fmt: skip
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--mixture", default="all_exhausted", choices=["all_exhausted", "first_exhausted"],
                       help="several sources: stop when all are seen (smaller ones repeat) or at the first exhausted")
        q.add_argument("--max-docs", type=int, default=None)

    t = dsub.add_parser("train-tokenizer", help="train a byte-level BPE (tokenizers) or a SentencePiece model")
    common(t)
    t.add_argument("--kind", choices=["bpe", "sentencepiece"], default="bpe")
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece only")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True)
    t.set_defaults(func=_train_tokenizer)

    pr = dsub.add_parser("prepare", help="tokenise a source once into memory-mapped shards")
    common(pr)
    pr.add_argument("--tokenizer", required=True, help="tokenizer.json / .model, or a folder holding one")
    pr.add_argument("--out", required=True)
    pr.add_argument("--shard-tokens", type=int, default=1 << 27)
    pr.set_defaults(func=_prepare)

    b = dsub.add_parser("bench", help=_bench.__doc__)
    common(b)
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--shards", required=True)
    b.add_argument("--seq-len", type=int, default=2048)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--seconds", type=float, default=5.0)
    b.add_argument("--json", default="bench_data.json")
    b.set_defaults(func=_bench)
