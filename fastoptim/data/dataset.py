"""Turn a data spec into training and validation tokens, preparing and caching them on first use.

A data spec is "stdlib" (the embedded default, see corpus.py) or comma-separated paths: text files or directories
(tokenized with a BPE trained on them), or .bin token shards / directories of them (used as they are).
Text corpora are tokenized once and cached under `cache_dir` (default $FASTOPTIM_CACHE, else ~/.cache/fastoptim) in
a folder named by a hash of the documents and settings, so a changed corpus never reuses stale tokens.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastoptim.data.corpus import STDLIB_SPEC, load_corpus, split_validation
from fastoptim.data.shards import MAX_VOCAB, find_shards, read_shard, write_shard
from fastoptim.data.tokenizer import END_OF_TEXT, train_tokenizer

CACHE_FORMAT = 1


@dataclass
class TokenData:
    train: list[np.ndarray]
    val: list[np.ndarray]
    vocab_size: int
    description: str

    @property
    def train_tokens(self) -> int:
        return sum(s.size for s in self.train)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTOPTIM_CACHE", Path.home() / ".cache" / "fastoptim"))


def is_shard_source(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix == ".bin" or (path.is_dir() and any(path.glob("*.bin")))


def check_data_spec(spec: str) -> list[str]:
    """The spec's sources, after checking that every path exists and that text and shards are not mixed."""
    sources = [s.strip() for s in spec.split(",") if s.strip()]
    if not sources:
        raise ValueError("data: empty data spec; use 'stdlib' or paths to text files or .bin token shards")
    for source in sources:
        if source != STDLIB_SPEC and not Path(source).expanduser().exists():
            raise FileNotFoundError(f"data: path {source!r} does not exist")
    kinds = {is_shard_source(s) for s in sources}
    if len(kinds) > 1:
        raise ValueError(f"data: {spec!r} mixes .bin token shards with text; give one kind")
    return sources


def prepare_data(spec: str, cache_dir: Path | None = None, vocab_size: int = 4096, max_bytes: int = 4_000_000,
                 val_fraction: float = 0.05) -> TokenData:
    sources = check_data_spec(spec)
    if is_shard_source(sources[0]):
        train, val = find_shards([Path(s).expanduser() for s in sources])
        # .bin shards carry no vocabulary size; every uint16 id is valid, so size the model for all of them.
        return TokenData([read_shard(p) for p in train], [read_shard(p) for p in val], MAX_VOCAB,
                         f"{len(train)} train / {len(val)} val token shards")
    if not 256 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} must be above 256 (the byte alphabet) and at most {MAX_VOCAB}")
    docs = load_corpus(sources, max_bytes)
    key = hashlib.sha256(repr((CACHE_FORMAT, vocab_size, val_fraction)).encode())
    for doc in docs:
        key.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
    folder = Path(cache_dir or default_cache_dir()) / f"corpus-{key.hexdigest()[:16]}"
    if not (folder / "meta.json").exists():
        _tokenize_into(folder, docs, vocab_size, val_fraction)
    meta = json.loads((folder / "meta.json").read_text())
    return TokenData([read_shard(folder / "train.bin")], [read_shard(folder / "val.bin")], meta["vocab_size"],
                     f"{spec} ({meta['documents']} documents, {meta['train_tokens']:,} train tokens, "
                     f"{meta['val_tokens']:,} val tokens, cached in {folder})")


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
        encoded = tokenizer.encode_batch([d.text for d in split_docs])
        tokens = np.concatenate([np.array(e.ids + [end_of_text], dtype=np.uint16) for e in encoded])
        write_shard(folder / f"{split}.bin", tokens)
        counts[f"{split}_tokens"] = int(tokens.size)
    meta = {"vocab_size": tokenizer.get_vocab_size(), "documents": len(docs), "end_of_text": end_of_text, **counts}
    tmp = folder / f"meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")  # written last: its presence means the folder is complete

