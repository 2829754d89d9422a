"""Turn a data spec into training, validation and evaluation tokens, preparing and caching them on first use.

A data spec is "stdlib" (the embedded default, see corpus.py) or comma-separated paths: text files or directories
(tokenized with a BPE trained on them), or `.bin` token shards / directories of them (used as they are: the output
of `fastoptim data tokenize`, or llm.c / modded-nanogpt shards).
Text corpora are tokenized once and cached under `cache_dir` (default $FASTOPTIM_CACHE, else ~/.cache/fastoptim) in
a folder named by a hash of the documents and settings, so a changed corpus never reuses stale tokens.

The vocabulary (the model's, which follows the data's) is the one the shards' headers record; llm.c shards record
none, so theirs is `vocab_size` when given (every shard is then scanned for ids beyond it) or all 65,536 uint16 ids.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastoptim.data.corpus import STDLIB_SPEC, load_corpus, split_validation
from fastoptim.data.shards import UINT16_VOCAB, find_shards, max_token, read_header, read_shard, write_shard
from fastoptim.data.tokenize import MANIFEST, end_of_text_id, load_tokenizer, read_manifest
from fastoptim.data.tokenizer import END_OF_TEXT, train_tokenizer

CACHE_FORMAT = 2
DEFAULT_TEXT_VOCAB = 4096
VAL_FRACTION = 0.05


@dataclass
class TokenData:
    train: list[np.ndarray]
    val: list[np.ndarray]
    vocab_size: int
    description: str
    tokenizer: Path | None = None  # the tokenizer.json that made the tokens, where known (to tokenize eval text)

    @property
    def train_tokens(self) -> int:
        return sum(s.size for s in self.train)


@dataclass(frozen=True)
class Capacity:
    """How many tokens a data spec holds, per shard of each split, known without tokenizing: exact for shards and
    cached corpora, an upper bound (one token per UTF-8 byte, plus each document's end-of-text) for text not
    tokenized yet."""
    train: tuple[int, ...]
    val: tuple[int, ...]
    exact: bool

    @property
    def train_tokens(self) -> int:
        return sum(self.train)

    @property
    def val_tokens(self) -> int:
        return sum(self.val)

    def windows(self, split: str, seq_len: int) -> int:
        """Windows of seq_len + 1 tokens the split's shards cut into (as the loader cuts them)."""
        return sum(max(0, (n - 1) // seq_len) for n in getattr(self, split))


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTOPTIM_CACHE", Path.home() / ".cache" / "fastoptim"))


def is_shard_source(source: str) -> bool:
    """A .bin file, or a folder of them, or the output folder of `fastoptim data tokenize` (finished or not)."""
    path = Path(source).expanduser()
    return path.suffix == ".bin" or (path.is_dir() and (any(path.glob("*.bin")) or (path / MANIFEST).exists()))


def check_data_spec(spec: str, what: str = "data") -> list[str]:
    """The spec's sources, after checking that every path exists and that text and shards are not mixed."""
    sources = [s.strip() for s in spec.split(",") if s.strip()]
    if not sources:
        raise ValueError(f"{what}: empty data spec; use 'stdlib' or paths to text files or .bin token shards")
    for source in sources:
        if source != STDLIB_SPEC and not Path(source).expanduser().exists():
            raise FileNotFoundError(f"{what}: path {source!r} does not exist")
    kinds = {is_shard_source(s) for s in sources}
    if len(kinds) > 1:
        raise ValueError(f"{what}: {spec!r} mixes .bin token shards with text; give one kind")
    return sources


def _shard_files(sources: list[str]) -> list[Path]:
    files = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            manifest = read_manifest(path)
            if manifest is not None and not manifest["done"]:
                raise ValueError(f"data: {source!r} is still being tokenized (or that run was killed): run the same "
                                 f"`fastoptim data tokenize` command again to finish it")
            files += sorted(path.glob("*.bin"))
        else:
            files.append(path)
    return files


def _shard_vocabulary(files: list[Path], vocab_size: int | None, what: str) -> int:
    """The vocabulary of a set of shards, after checking that every id fits it (see the module docstring)."""
    infos = [read_header(f) for f in files]
    recorded = {info.vocab_size for info in infos if info.vocab_size is not None}
    if len(recorded) > 1:
        raise ValueError(f"{what}: shards of different vocabularies ({sorted(recorded)}) in one data set")
    vocab = vocab_size or (recorded.pop() if recorded else UINT16_VOCAB)
    for info in infos:
        if info.vocab_size is not None and info.vocab_size > vocab:
            raise ValueError(f"{info.path}: its ids span a vocabulary of {info.vocab_size:,}, beyond "
                             f"vocab_size={vocab:,}")
        if info.vocab_size is None and vocab < UINT16_VOCAB and (top := max_token(read_shard(info.path))) >= vocab:
            raise ValueError(f"{info.path}: token id {top:,} is beyond vocab_size={vocab:,}")
    return vocab


def _tokenizer_beside(sources: list[str]) -> Path | None:
    """The tokenizer.json that `fastoptim data tokenize` leaves beside its shards, when there is exactly one."""
    found = {Path(s).expanduser() / "tokenizer.json" for s in sources if Path(s).expanduser().is_dir()}
    found = [p for p in found if p.exists()]
    return found[0] if len(found) == 1 else None


def _corpus_folder(docs, cache_dir, vocab_size: int, val_fraction: float) -> Path:
    key = hashlib.sha256(repr((CACHE_FORMAT, vocab_size, val_fraction)).encode())
    for doc in docs:
        key.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
    return Path(cache_dir or default_cache_dir()) / f"corpus-{key.hexdigest()[:16]}"


def _text_vocabulary(vocab_size: int | None) -> int:
    vocab = DEFAULT_TEXT_VOCAB if vocab_size is None else vocab_size
    if vocab <= 256:
        raise ValueError(f"vocab_size={vocab} must be above 256 (the byte alphabet) for text data")
    return vocab


def data_capacity(spec: str, cache_dir: Path | None = None, vocab_size: int | None = None,
                  max_bytes: int | None = None, val_fraction: float = VAL_FRACTION) -> Capacity:
    """Tokens per split of `spec` without tokenizing it (see Capacity): seconds even for the whole corpus."""
    sources = check_data_spec(spec)
    if is_shard_source(sources[0]):
        train, val = find_shards(_shard_files(sources))
        return Capacity(tuple(read_header(f).tokens for f in train), tuple(read_header(f).tokens for f in val), True)
    docs = load_corpus(sources, max_bytes)
    folder = _corpus_folder(docs, cache_dir, _text_vocabulary(vocab_size), val_fraction)
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        return Capacity((meta["train_tokens"],), (meta["val_tokens"],), True)
    train, val = split_validation(docs, val_fraction)
    return Capacity((_token_bound(train),), (_token_bound(val),), False)


def _token_bound(docs) -> int:
    """A byte-level BPE makes at most one token per UTF-8 byte; each document adds its end-of-text."""
    return sum(len(d.text.encode()) + 1 for d in docs)


def prepare_data(spec: str, cache_dir: Path | None = None, vocab_size: int | None = None,
                 max_bytes: int | None = None, val_fraction: float = VAL_FRACTION) -> TokenData:
    sources = check_data_spec(spec)
    if is_shard_source(sources[0]):
        train, val = find_shards(_shard_files(sources))
        vocab = _shard_vocabulary(train + val, vocab_size, "data")
        return TokenData([read_shard(p) for p in train], [read_shard(p) for p in val], vocab,
                         f"{len(train)} train / {len(val)} val token shards, vocabulary {vocab:,}",
                         _tokenizer_beside(sources))
    vocab = _text_vocabulary(vocab_size)
    docs = load_corpus(sources, max_bytes)
    folder = _corpus_folder(docs, cache_dir, vocab, val_fraction)
    if not (folder / "meta.json").exists():
        _tokenize_into(folder, docs, vocab, val_fraction)
    meta = json.loads((folder / "meta.json").read_text())
    return TokenData([read_shard(folder / "train.bin")], [read_shard(folder / "val.bin")], meta["vocab_size"],
                     f"{spec} ({meta['documents']} documents, {meta['train_tokens']:,} train tokens, "
                     f"{meta['val_tokens']:,} val tokens, cached in {folder})", folder / "tokenizer.json")


def prepare_eval_data(spec: str, data: TokenData, cache_dir: Path | None = None) -> tuple[list[np.ndarray], str]:
    """The tokens of a separate eval set (every shard of `spec`, or its text tokenized with the training data's
    tokenizer), checked against the training data's vocabulary; and a description."""
    sources = check_data_spec(spec, what="eval_data")
    if is_shard_source(sources[0]):
        files = _shard_files(sources)
        _shard_vocabulary(files, data.vocab_size, "eval_data")
        return [read_shard(f) for f in files], f"{len(files)} eval token shards ({spec})"
    if data.tokenizer is None:
        raise ValueError(f"eval_data={spec!r} is text, but the training data's tokenizer is unknown (its shards have "
                         f"no tokenizer.json beside them): tokenize the eval text with `fastoptim data tokenize` "
                         f"and the same tokenizer, and pass those shards")
    tokenizer = load_tokenizer(data.tokenizer)
    docs = load_corpus(sources)
    key = hashlib.sha256(data.tokenizer.read_bytes())
    for doc in docs:
        key.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
    path = Path(cache_dir or default_cache_dir()) / f"eval-{key.hexdigest()[:16]}.bin"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        eos = end_of_text_id(tokenizer, None, str(data.tokenizer))
        write_shard(path, _encode(tokenizer, [d.text for d in docs], eos), data.vocab_size)
    return [read_shard(path)], f"{spec} ({len(docs)} documents, tokenized with {data.tokenizer})"


def _encode(tokenizer, texts: list[str], end_of_text: int) -> np.ndarray:
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    return np.concatenate([np.array(e.ids + [end_of_text], dtype=np.int64) for e in encoded])


def _tokenize_into(folder: Path, docs, vocab_size: int, val_fraction: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = split_validation(docs, val_fraction)
    # Fit the tokenizer on the training documents only, so validation text stays unseen.
    tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size)
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    tmp = folder / f"tokenizer.json.tmp{os.getpid()}"
    tokenizer.save(str(tmp))
    os.replace(tmp, folder / "tokenizer.json")
    counts = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens = _encode(tokenizer, [d.text for d in split_docs], end_of_text)
        write_shard(folder / f"{split}.bin", tokens, tokenizer.get_vocab_size())
        counts[f"{split}_tokens"] = int(tokens.size)
    meta = {"vocab_size": tokenizer.get_vocab_size(), "documents": len(docs), "end_of_text": end_of_text, **counts}
    tmp = folder / f"meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")  # written last: its presence means the folder is complete
