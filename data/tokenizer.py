"""Tokenizers: train a byte-level BPE (``tokenizers``) or a SentencePiece BPE/unigram model, load
either back (or anyone's ``tokenizer.json`` / SentencePiece model), and use them through one small
interface.

The tokenizers trained here have ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2 (SentencePiece adds
``<unk>`` = 3; byte fallback means it is never needed for valid UTF-8). A tokenizer from elsewhere
(GPT-2's ``<|endoftext|>``, Llama's ``<s>`` / ``</s>`` without a pad) has its special tokens found
by role, as transformers does; a role it lacks takes its end-of-text token (pad and bos mark no
text of their own: the loss ignores padding, and a document still starts after one), and
``describe()`` records which token plays each role.
A tokenizer is identified by the SHA-256 of its file and of what decides its ids (the file less
the settings ``encode`` never reads), recorded in shard manifests and checkpoints so data tokenised
with one tokenizer is never read with another.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
KINDS = ("bpe", "sentencepiece")
# the names each role goes by in the tokenizers people use, most specific first
ROLE_TOKENS = {
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>", "[SEP]"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>", "[CLS]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>"),
}


def _by_role(find) -> dict[str, int | None]:
    """{role: id or None} from ``find(token) -> id or None``, trying each role's names in order."""
    return {role: next((i for i in map(find, names) if i is not None), None) for role, names in ROLE_TOKENS.items()}


class Tokenizer:
    """Either kind behind ``encode``/``decode``; ``path`` is the tokenizer's one file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            found = [p for p in (self.path / "tokenizer.json", self.path / "tokenizer.model") if p.exists()]
            if not found:
                raise ValueError(f"no tokenizer.json or tokenizer.model in {self.path}")
            self.path = found[0]
        if not self.path.is_file():
            raise ValueError(f"tokenizer file {self.path} does not exist")
        if self.path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            self.kind = "bpe"
            try:
                self._tok = HFTokenizer.from_file(str(self.path))
            except Exception as exc:  # tokenizers raises a bare Exception on a damaged file
                raise ValueError(f"tokenizer file {self.path} is damaged or not a tokenizers JSON file: {exc}") from None
            self.vocab_size = self._tok.get_vocab_size()
            roles = _by_role(self._tok.token_to_id)
        elif self.path.suffix == ".model":
            import sentencepiece as spm

            self.kind = "sentencepiece"
            try:
                self._tok = spm.SentencePieceProcessor(model_file=str(self.path))
            except (OSError, RuntimeError) as exc:  # sentencepiece: a model it cannot parse
                raise ValueError(f"tokenizer file {self.path} is damaged or not a SentencePiece model: {exc}") from None
            self.vocab_size = self._tok.get_piece_size()
            roles = {role: (i if i >= 0 else None) for role, i in
                     (("pad", self._tok.pad_id()), ("bos", self._tok.bos_id()), ("eos", self._tok.eos_id()))}  # fmt: skip
        else:
            raise ValueError(f"unknown tokenizer file {self.path}: expected tokenizer.json or a .model")
        if roles["eos"] is None:
            names = ", ".join(ROLE_TOKENS["eos"])
            raise ValueError(f"tokenizer {self.path} has no end-of-text token (looked for {names}); documents are "
                             f"packed with one between them: add one of those as a special token")  # fmt: skip
        self.stand_ins = {role: "eos" for role in ("pad", "bos") if roles[role] is None}  # what a role lacked
        roles = {role: roles["eos"] if i is None else i for role, i in roles.items()}
        self.pad_id, self.bos_id, self.eos_id = roles["pad"], roles["bos"], roles["eos"]
        self.special_tokens = {role: self.token(i) for role, i in roles.items()}
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.encoding_sha256 = _encoding_sha256(raw, self.kind)

    def token(self, i: int) -> str:
        return self._tok.id_to_token(i) if self.kind == "bpe" else self._tok.id_to_piece(i)

    def encode(self, text: str) -> list[int]:
        if self.kind == "bpe":
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "bpe":
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return self._tok.encode(texts)

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)]
        return self._tok.decode(ids)

    def save(self, directory: str | Path) -> Path:
        """Copy the tokenizer file into ``directory`` (beside data or a checkpoint)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / ("tokenizer.json" if self.kind == "bpe" else "tokenizer.model")
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)
        return target

    def describe(self) -> dict:
        """What identifies the tokenizer (its file's sha256), and which token plays each role."""
        specials = {role: [getattr(self, f"{role}_id"), self.special_tokens[role]] for role in ("pad", "bos", "eos")}
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256, "file": self.path.name,
                "encoding_sha256": self.encoding_sha256,
                "specials": specials, **({"stand_ins": self.stand_ins} if self.stand_ins else {})}  # fmt: skip


def _encoding_sha256(raw: bytes, kind: str) -> str:
    """What decides the ids ``encode`` gives (no special tokens added): a tokenizer.json less the
    settings it never reads (the post-processor that puts <bos> first for transformers, padding,
    truncation). An export's tokenizer.json, which gains that post-processor, tokenises the same
    text to the same ids as the one it was trained with, and shares its cached shards."""
    if kind != "bpe":
        return hashlib.sha256(raw).hexdigest()
    spec = {k: v for k, v in json.loads(raw).items() if k not in ("post_processor", "padding", "truncation")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def check_same_tokenizer(tokenizer: Tokenizer | None, recorded: dict | None, where: str) -> None:
    """Refuse a tokenizer whose file differs from the one ``where`` recorded (its sha256): ids
    would silently mean other text. Nothing recorded (older checkpoints, synthetic tasks): no check."""
    if tokenizer is None or not recorded or not recorded.get("sha256"):
        return
    if tokenizer.sha256 != recorded["sha256"] and tokenizer.encoding_sha256 != recorded.get("encoding_sha256"):
        raise ValueError(
            f"tokenizer {tokenizer.path} (sha256 {tokenizer.sha256[:16]}...) is not the one {where} was trained "
            f"with (sha256 {recorded['sha256'][:16]}..., {recorded.get('file')}): restore that file"
        )


def check_vocab(tokenizer: Tokenizer, model_vocab: int) -> None:
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_vocab}; set model vocab_size >= {tokenizer.vocab_size}"
        )


MIN_VOCAB = 256 + len(SPECIALS) + 1  # every byte (byte-level BPE, sentencepiece's byte fallback), specials, unk


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, kind: str = "bpe", vocab_size: int = 8192, model_type: str = "bpe",
    progress: bool = False,
) -> Tokenizer:
    """Train on ``texts`` and save into ``out_dir``; ``model_type`` (bpe|unigram) is for sentencepiece.
    ``progress``: a bar of the documents read (and of BPE's merges)."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"tokenizer vocab_size must be an int >= {MIN_VOCAB} (bytes and special tokens), got {vocab_size!r}")
    if progress:
        from tqdm import tqdm

        texts = tqdm(texts, desc="tokenizer: reading documents", unit="doc")
    seen = {"documents": 0, "characters": 0, "failed": []}
    texts = _counted(texts, seen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )  # fmt: skip
        tok.train_from_iterator(texts, trainer=trainer)
        tok.save(str(out / "tokenizer.json"))
        return _trained(Tokenizer(out / "tokenizer.json"), seen)

    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"sentencepiece model_type must be bpe or unigram, got {model_type!r}")
    model = io.BytesIO()
    try:
        _train_sentencepiece(spm, texts, model, vocab_size, model_type)
    except RuntimeError:  # SentencePiece reports what the documents' stream raised as its own error
        if seen["failed"]:
            raise seen["failed"][0] from None
        raise
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"kind": kind, "model_type": model_type}))
    return _trained(Tokenizer(out / "tokenizer.model"), seen)


def _counted(texts: Iterable[str], seen: dict) -> Iterator[str]:
    """``texts``, counted into ``seen``, with what their stream raised kept in ``seen["failed"]``."""
    try:
        for text in texts:
            seen["documents"] += 1
            seen["characters"] += len(text)
            yield text
    except Exception as exc:
        seen["failed"].append(exc)
        raise


def _trained(tok: Tokenizer, seen: dict) -> Tokenizer:
    """The trained tokenizer, its totals said on stderr (a log file then records what it read)."""
    print(f"tokenizer: {tok.kind} of {tok.vocab_size:,} tokens trained on {seen['documents']:,} documents "
          f"({seen['characters']:,} characters) -> {tok.path}", file=sys.stderr)  # fmt: skip
    return tok


def _train_sentencepiece(spm, texts, model, vocab_size: int, model_type: str) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        max_sentence_length=1 << 16, input_sentence_size=2_000_000, shuffle_input_sentence=False,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on lines; newlines themselves are learnt through byte fallback."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line
