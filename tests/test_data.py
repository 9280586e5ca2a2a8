"""Data: sources, tokenizers, packing, sharding across ranks and workers, resume, shards."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_close

from bla.data import (
    DataSourceConfig, LoaderConfig, Packer, ShardDocuments, SourceConfig, Tokenizer, build_loader, check_vocab,
    collate, load_documents, parse_source, prepare, train_tokenizer,
)  # fmt: skip
from bla.data.loader import worker_batches
from bla.model import BLALM, apply_overrides, load_preset

STDLIB_VAL = DataSourceConfig([SourceConfig("stdlib", split="validation")])


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    texts = (ex["text"] for ex in load_documents(STDLIB_VAL))
    return train_tokenizer(texts, tmp_path_factory.mktemp("bpe"), kind="bpe", vocab_size=600)


@pytest.fixture()
def doc_files(tmp_path):
    """30 small documents as jsonl, each text unique, with an extra field."""
    path = tmp_path / "docs.jsonl"
    with path.open("w") as f:
        for i in range(30):
            f.write(json.dumps({"content": f"document {i}: " + "word " * (i % 7 + 1), "id": i}) + "\n")
    return path


def files_source(path, field="content"):
    return DataSourceConfig([SourceConfig("files", str(path), text_field=field)])


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("kind,model_type", [("bpe", "bpe"), ("sentencepiece", "bpe"), ("sentencepiece", "unigram")])
def test_tokenizers_train_save_load_round_trip(tmp_path, kind, model_type):
    texts = [ex["text"] for ex in load_documents(STDLIB_VAL)]
    tok = train_tokenizer(texts, tmp_path / "a", kind=kind, vocab_size=500, model_type=model_type)
    saved = tok.save(tmp_path / "b")
    again = Tokenizer(saved.parent)
    text = "def f(x):\n\treturn  x ** 2  # naïve ✓\n\n"
    ids = again.encode(text)
    assert ids == tok.encode(text) and again.decode(ids) == text
    assert again.sha256 == tok.sha256 and (again.pad_id, again.bos_id, again.eos_id) == (0, 1, 2)
    assert again.vocab_size <= 500
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])  # truncated in transfer
    with pytest.raises(ValueError, match=f"tokenizer file {saved} is damaged"):
        Tokenizer(saved)


def test_tokenizer_bigger_than_model_is_refused(bpe):
    with pytest.raises(ValueError, match="model's vocab_size is 256"):
        check_vocab(bpe, 256)


# ---------------------------------------------------------------- sources


def test_local_file_formats(tmp_path, doc_files):
    import datasets

    rows = [json.loads(line) for line in doc_files.read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "docs.parquet"))
    (tmp_path / "txt").mkdir()
    for r in rows[:3]:
        (tmp_path / "txt" / f"{r['id']}.txt").write_text(r["content"] + "\nsecond line\n")
    jsonl = [ex["text"] for ex in load_documents(files_source(doc_files))]
    parquet = [ex["text"] for ex in load_documents(files_source(tmp_path / "*.parquet"))]
    txt = [ex["text"] for ex in load_documents(files_source(tmp_path / "txt" / "*.txt", "text"))]
    assert jsonl == parquet == [r["content"] for r in rows]
    assert len(txt) == 3 and all(t.endswith("second line\n") for t in txt)  # one document per file


def test_hub_code_path_on_a_local_dataset_folder(tmp_path, doc_files):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(doc_files.read_text())
    src = parse_source(f"hub:{folder}:train#content")
    assert src.kind == "hub" and src.split == "train"
    docs = [ex["text"] for ex in load_documents(DataSourceConfig([src]))]
    assert len(docs) == 30 and docs[0].startswith("document 0")


def test_save_to_disk_folders_are_sources(tmp_path):
    import datasets

    rows = {"content": [f"saved {i}" for i in range(7)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    docs = [ex["text"] for ex in load_documents(DataSourceConfig([parse_source(f"hub:{tmp_path / 'one'}#content")]))]
    assert docs == rows["content"]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                   "validation": datasets.Dataset.from_dict({"content": ["held out"]})})  # fmt: skip
    splits.save_to_disk(str(tmp_path / "dict"))
    docs = [ex["text"] for ex in load_documents(DataSourceConfig([parse_source(f"hub:{tmp_path / 'dict'}:validation#content")]))]
    assert docs == ["held out"]
    with pytest.raises(ValueError, match="no split 'test'; its splits are"):
        load_documents(DataSourceConfig([parse_source(f"hub:{tmp_path / 'dict'}:test#content")]))


def test_mixture_draws_from_both(tmp_path, doc_files):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"content": f"other {i}"}) + "\n" for i in range(30)))
    cfg = DataSourceConfig([SourceConfig("files", str(doc_files), text_field="content", weight=1.0),
                            SourceConfig("files", str(other), text_field="content", weight=3.0)], seed=1)  # fmt: skip
    first = [ex["text"] for ex in itertools.islice(load_documents(cfg), 20)]
    assert first == [ex["text"] for ex in itertools.islice(load_documents(cfg), 20)]  # deterministic
    n_other = sum(t.startswith("other") for t in first)
    assert 8 < n_other < 20
    # the end of the stream, as chosen: every document seen (small sources repeat), or no repeats
    everything = [ex["text"] for ex in load_documents(cfg)]
    assert set(everything) >= {f"other {i}" for i in range(30)} and len(everything) > len(set(everything))
    cfg.mixture = "first_exhausted"
    once = [ex["text"] for ex in load_documents(cfg)]
    assert len(once) == len(set(once)) < len(set(everything))
    cfg.mixture = "most"
    with pytest.raises(ValueError, match="mixture must be one of"):
        load_documents(cfg)


def test_embedded_corpus_split_is_disjoint_and_deterministic():
    from bla.data.sources import stdlib_files

    train, val = stdlib_files("train"), stdlib_files("validation")
    assert train and val and not set(train) & set(val)
    assert val == stdlib_files("validation")
    # pathlib's order (part by part: "a/b.py" before "a.py"; the corpus's document order, which the
    # cached tokenizers and shards were built in), and none of the packages installed beside the stdlib
    assert train == sorted(train, key=Path) and len(train) > 1000
    assert not any(part in ("site-packages", "dist-packages") for f in train + val for part in Path(f).parts)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("files:/nonexistent/*.jsonl", "no file matches"),
        ("hub:/nonexistent/dataset_folder", "cannot load dataset"),
        ("nope:x", "unknown source kind"),
    ],
)
def test_bad_sources(spec, match):
    with pytest.raises(ValueError, match=match):
        load_documents(DataSourceConfig([parse_source(spec)]))


def test_empty_corpus_and_missing_field(tmp_path, doc_files):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_documents(files_source(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="no text field 'body'; its fields are \\['content', 'id'\\]"):
        load_documents(files_source(doc_files, "body"))


@pytest.mark.parametrize("text", ["", " \\n\\t "])
def test_a_corpus_of_empty_documents_is_refused(tmp_path, bpe, text):
    """Empty or whitespace-only documents (whitespace tokenises to a token or two): refused, not
    trained on."""
    (tmp_path / "blank.jsonl").write_text(f'{{"content": "{text}"}}\n' * 5)
    with pytest.raises(ValueError, match="the source's 5 documents hold no text .each is empty or whitespace only"):
        prepare(files_source(tmp_path / "blank.jsonl"), bpe, tmp_path / "shards", progress=False)
    assert not (tmp_path / "shards").exists()


def test_damaged_documents_name_their_file_and_line(tmp_path):
    """Rows that only go wrong later in a file, non-UTF-8 bytes, broken JSON: one error naming the place."""
    import datasets

    def first_error(path, field="text"):
        with pytest.raises(ValueError) as info:
            list(load_documents(files_source(path, field)))
        return str(info.value)

    later = tmp_path / "later.jsonl"
    later.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": 7}\n')
    assert first_error(later) == f"{later}:3: field 'text' holds int, not text"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert first_error(latin).startswith(f"{latin}:2: not UTF-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    assert first_error(broken).startswith(f"{broken}:2: not a JSON line")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_bytes(b"caf\xe9")
    assert first_error(tmp_path / "txt" / "*.txt").startswith(f"{tmp_path / 'txt' / 'a.txt'} is not UTF-8 text")
    datasets.Dataset.from_dict({"text": ["a", "b", None]}).to_parquet(str(tmp_path / "nulls.parquet"))
    assert "document 2 has a text field of type NoneType, not text" in first_error(tmp_path / "nulls.parquet")


# ---------------------------------------------------------------- packing


def test_packing_boundaries_and_positions():
    p = Packer(seq_len=8, bos_id=1, eos_id=2)
    p.add([10, 11, 12])  # -> 1 10 11 12 2   (positions 0..4)
    p.add([20, 21, 22, 23, 24, 25, 26])  # -> 1 20 ... 26 2 (positions 0..8)
    r1 = p.pop_row()
    assert r1["input_ids"] == [1, 10, 11, 12, 2, 1, 20, 21]
    assert r1["positions"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert r1["labels"] == [10, 11, 12, 2, -100, 20, 21, 22]  # eos -> next bos is not a label
    r2 = p.pop_row() if p.has_row() else None
    assert r2 is None  # 14 tokens: one row of 8 (+1) and 6 left
    p.add([30])
    r2 = p.pop_row()
    assert r2["input_ids"] == [22, 23, 24, 25, 26, 2, 1, 30]
    assert r2["positions"] == [3, 4, 5, 6, 7, 8, 0, 1]  # the split document keeps its positions
    batch = collate([r1, r2])
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 14, 16]
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        Packer(seq_len=0, bos_id=1, eos_id=2)


def test_packed_batch_equals_separate_segments():
    torch.manual_seed(0)
    model = BLALM(apply_overrides(load_preset("tiny"), ["vocab_size=64"])).eval()
    p = Packer(seq_len=24, bos_id=1, eos_id=2)
    for n in (9, 30, 3, 17):
        p.add(torch.randint(3, 64, (n,)).tolist())
    rows = [p.pop_row(), p.pop_row()]
    batch = collate(rows)
    with torch.no_grad():
        packed = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], positions=batch["positions"]).logits
        cu = batch["cu_seqlens"].tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            alone = model(batch["input_ids"][:, a:b], positions=batch["positions"][:, a:b]).logits
            assert_close(f"segment {a}:{b}", packed[:, a:b], alone, atol=1e-5)


# ---------------------------------------------------------------- loaders


def _docs_of(batches, tok):
    """Decode the documents of a stream of batches (a document runs from its bos to the next; a
    stream's very last eos is only ever a label, so the end of the stream closes one too)."""
    ids = torch.cat([b["input_ids"][0] for b in batches]).tolist()
    docs, cur = [], None
    for t in ids + [tok.bos_id]:
        if t == tok.bos_id:
            if cur is not None:
                docs.append(tok.decode(cur))
            cur = []
        elif cur is not None and t not in (tok.eos_id, tok.pad_id):
            cur.append(t)
    return docs


def test_two_ranks_two_workers_cover_every_document_once(bpe, doc_files):
    src = files_source(doc_files)
    expected = sorted(ex["text"] for ex in load_documents(src))
    seen = []
    for rank in range(2):
        loader = build_loader(LoaderConfig(seq_len=16, batch_size=2, rank=rank, world_size=2, num_workers=2, loop=False), bpe, src)
        for w in range(2):
            shard = rank * 2 + w
            batches = [b for b, _ in worker_batches(loader.docs, loader.cfg, loader.ids, shard, 4, loader.states[w])]
            seen += _docs_of(batches, bpe)
    assert sorted(seen) == expected


def test_streaming_and_shard_loaders_are_identical(tmp_path, bpe):
    manifest = prepare(STDLIB_VAL, bpe, tmp_path / "shards", shard_tokens=20_000, progress=False)
    assert len(manifest["shards"]) > 1 and manifest["dtype"] == "uint16"
    for rank in range(2):
        cfg = LoaderConfig(seq_len=64, batch_size=3, rank=rank, world_size=2, loop=False)
        streamed = list(build_loader(cfg, bpe, source=STDLIB_VAL))
        sharded = list(build_loader(cfg, bpe, shards=tmp_path / "shards"))
        assert len(streamed) == len(sharded) > 10
        for a, b in zip(streamed, sharded):
            for key in a:
                assert torch.equal(a[key], b[key]), key


def test_shards_made_with_another_tokenizer_are_refused(tmp_path, bpe):
    prepare(STDLIB_VAL, bpe, tmp_path / "shards", progress=False, max_docs=3)
    other = train_tokenizer(["completely different text " * 50], tmp_path / "other", vocab_size=300, progress=True)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 260"):
        train_tokenizer(["text"], tmp_path / "bad", vocab_size=-5)
    with pytest.raises(ValueError, match="were made with tokenizer"):
        ShardDocuments(tmp_path / "shards", other)
    with pytest.raises(ValueError, match="holds no manifest.json"):
        ShardDocuments(tmp_path / "other")


def test_damaged_shards_are_refused_and_prepare_replaces_whole(tmp_path, bpe):
    out = tmp_path / "shards"
    first = prepare(STDLIB_VAL, bpe, out, shard_tokens=20_000, progress=False)
    second = prepare(STDLIB_VAL, bpe, out, shard_tokens=1 << 27, progress=False, max_docs=5)  # over the first
    assert len(first["shards"]) > 1 and len(second["shards"]) == 1
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.bin", "shard_00000.idx.npy"]  # none stale
    assert not list(tmp_path.glob(".shards.*"))  # no private build folder left behind
    binary = out / "shard_00000.bin"
    good = binary.read_bytes()
    binary.write_bytes(good[:10] + b"\xff\xff" + good[12:])  # same size, token 5 now 65535
    docs = ShardDocuments(out)
    with pytest.raises(ValueError, match=r"shard_00000.bin: document 0 holds token id 65535, beyond the tokenizer's"):
        docs[0]
    binary.write_bytes(good[:-4])
    with pytest.raises(ValueError, match=r"shard_00000.bin holds .* \(truncated or changed\)"):
        ShardDocuments(out)
    (out / "manifest.json").write_text('{"tokenizer": {')
    with pytest.raises(ValueError, match=r"manifest.json is damaged \(JSONDecodeError"):
        ShardDocuments(out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not shards")
    with pytest.raises(ValueError, match="is not a shard directory"):
        prepare(STDLIB_VAL, bpe, tmp_path / "mine", progress=False, max_docs=2)
    assert (tmp_path / "mine" / "notes.txt").exists()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("backend", ["stream", "shards"])
def test_resume_equals_uninterrupted(tmp_path, bpe, doc_files, num_workers, backend):
    src = files_source(doc_files)
    kw = {"source": src} if backend == "stream" else {"shards": tmp_path / "s"}
    if backend == "shards":
        prepare(src, bpe, tmp_path / "s", progress=False)
    cfg = LoaderConfig(seq_len=8, batch_size=2, num_workers=num_workers, loop=True)  # loops over epochs
    full = list(itertools.islice(build_loader(cfg, bpe, **kw), 40))
    first = build_loader(cfg, bpe, **kw)
    head = list(itertools.islice(first, 17))
    state = first.state_dict()
    resumed = build_loader(cfg, bpe, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    tail = list(itertools.islice(resumed, 23))
    for i, (a, b) in enumerate(zip(full, head + tail)):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["positions"], b["positions"]), i


def test_loader_layout_mismatch_and_bad_config(bpe, doc_files):
    loader = build_loader(LoaderConfig(seq_len=8, batch_size=2), bpe, files_source(doc_files))
    other = build_loader(LoaderConfig(seq_len=8, batch_size=2, world_size=2), bpe, files_source(doc_files))
    with pytest.raises(ValueError, match="exact resume needs the same layout"):
        other.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        LoaderConfig(seq_len=0).validate()
    too_many = LoaderConfig(seq_len=8, batch_size=1, world_size=40, rank=35)
    with pytest.raises(ValueError, match="fewer documents than ranks x workers"):
        next(iter(build_loader(too_many, bpe, files_source(doc_files))))


def test_compressed_files_are_read_with_their_line_numbers(tmp_path, doc_files):
    """.jsonl.gz, .jsonl.xz, .txt.bz2 (datasets' compressions, through fsspec): the same documents
    as the plain files, and a broken line still named by file and line."""
    import bz2
    import gzip
    import lzma

    plain = [ex["text"] for ex in load_documents(files_source(doc_files))]
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "docs.jsonl.gz").write_bytes(gzip.compress(doc_files.read_bytes()))
    (tmp_path / "xz").mkdir()
    (tmp_path / "xz" / "docs.jsonl.xz").write_bytes(lzma.compress(doc_files.read_bytes()))
    for folder in ("gz", "xz"):
        assert [ex["text"] for ex in load_documents(files_source(tmp_path / folder / "*"))] == plain
    (tmp_path / "bz").mkdir()
    (tmp_path / "bz" / "a.txt.bz2").write_bytes(bz2.compress("one document\nof two lines\n".encode()))
    assert [ex["text"] for ex in load_documents(files_source(tmp_path / "bz" / "*.txt.bz2", "text"))] == ["one document\nof two lines\n"]
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"content": "fine"}\n{"content": \n'))
    with pytest.raises(ValueError, match=r"broken.jsonl.gz:2: not a JSON line"):
        list(load_documents(files_source(broken)))


def test_hub_sources_take_data_files_data_dir_and_revision(tmp_path, doc_files):
    folder = tmp_path / "repo"
    (folder / "part_a").mkdir(parents=True)
    (folder / "part_b").mkdir()
    (folder / "part_a" / "train.jsonl").write_text(doc_files.read_text())
    (folder / "part_b" / "train.jsonl").write_text('{"content": "only b"}\n')
    src = parse_source(f"hub:{folder}?data_dir=part_b:train#content")
    assert src.options == {"data_dir": "part_b"} and "data_dir=part_b" in src.describe()
    assert [ex["text"] for ex in load_documents(DataSourceConfig([src]))] == ["only b"]
    src = parse_source(f"hub:{folder}?data_files=part_a/*.jsonl#content")
    assert len([ex["text"] for ex in load_documents(DataSourceConfig([src]))]) == 30
    with pytest.raises(ValueError, match="options must be data_files, data_dir, revision as key=value, got \\['branch'\\]"):
        parse_source(f"hub:{folder}?branch=main")


def test_tokenizers_from_elsewhere_find_their_special_tokens_by_role(tmp_path):
    """A GPT-2-style tokenizer.json (one <|endoftext|>, no pad) and a Llama-style SentencePiece model
    (<unk> 0, <s> 1, </s> 2, no pad) load: each role's token found by name, a missing pad (and
    GPT-2's bos) taken by the end-of-text token and recorded; documents pack between them."""
    import sentencepiece as spm
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from bla.data.packing import Packer

    texts = [ex["text"] for ex in load_documents(STDLIB_VAL)][:40]
    gpt2 = HFTokenizer(models.BPE())
    gpt2.pre_tokenizer, gpt2.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    gpt2.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    gpt2.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path / "tokenizer.json")
    end = tok._tok.token_to_id("<|endoftext|>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (end, end, end) and tok.stand_ins == {"pad": "eos"}  # bos: its own name
    assert tok.describe()["specials"]["eos"] == [end, "<|endoftext|>"]
    assert tok.decode(tok.encode("x = 1\n")) == "x = 1\n"
    packer = Packer(16, tok.bos_id, tok.eos_id)
    packer.add(tok.encode("ab"))
    assert packer.tokens[0] == end and packer.tokens[-1] == end

    model = tmp_path / "llama.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=f, vocab_size=600, unk_id=0, bos_id=1,
                                       eos_id=2, pad_id=-1, byte_fallback=True, hard_vocab_limit=False, minloglevel=2)  # fmt: skip
    tok = Tokenizer(model)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2) and tok.special_tokens["bos"] == "<s>"
    assert tok.stand_ins == {"pad": "eos"}

    none = HFTokenizer(models.BPE())
    none.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    none.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    none.save(str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="has no end-of-text token .looked for <eos>, </s>"):
        Tokenizer(tmp_path / "none.json")


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_training_a_tokenizer_on_a_document_without_the_field_is_one_line(tmp_path, kind):
    """A later line without the text field: the same named error from either trainer (SentencePiece
    wrapped it in a RuntimeError of its own before)."""
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "hello world"}\n{"content": "more"}\n')
    texts = (ex["text"] for ex in load_documents(files_source(bad, "text")))
    with pytest.raises(ValueError, match="docs.jsonl:2: no text field 'text'; its fields are \\['content'\\]"):
        train_tokenizer(texts, tmp_path / "tok", kind=kind, vocab_size=300)


def test_the_training_benchmarks_packed_batches_are_packed_as_the_trainer_packs():
    """benchmarks/training.py --packed: one packed row of documents, positions restarting at every
    document, no label across a document's end inside a row, cu_seqlens padded to a power of two."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from training import packed_batch

    b = packed_batch(vocab=100, rows=3, seq_len=64, mean_doc=12, seed=1)
    assert {k: tuple(v.shape) for k, v in b.items() if k != "cu_seqlens"} == {"input_ids": (1, 192), "labels": (1, 192),
                                                                               "positions": (1, 192)}  # fmt: skip
    cu = b["cu_seqlens"].tolist()
    n = len(cu)
    assert n & (n - 1) == 0 and cu[0] == 0 and cu[-1] == 192 and cu == sorted(cu)
    starts = sorted(set(cu[:-1]))
    assert {0, 64, 128} <= set(starts)  # a row's start is a document's
    pos, labels = b["positions"][0].tolist(), b["labels"][0].tolist()
    for a, z in zip(starts, starts[1:] + [192]):
        assert pos[a:z] == list(range(z - a))
        if z % 64:  # a document that ends inside its row: its last token has no label
            assert labels[z - 1] == -100
