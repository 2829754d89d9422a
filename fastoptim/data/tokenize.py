"""`fastoptim data tokenize`: text through any HF `tokenizers` tokenizer into token shards, streaming and resumable.

Inputs are files and folders (walked in sorted order, hidden files skipped). A `.jsonl` file holds one document per
line (its "text" field, or `text_field`); any other file is UTF-8 text, cut into documents of about 64 KB at line
boundaries as the embedded corpus is. A document goes to the validation split when a hash of its name falls below
`val_fraction`, else to training; its tokens are followed by the tokenizer's end-of-text id. Files that are not UTF-8
text are skipped and listed at the end.

Memory stays bounded: documents are encoded in batches of about `batch_bytes` of text and appended to each split's
open shard, which closes at `shard_tokens` tokens (at a document boundary) as `train_000000.bin`, `val_000000.bin`, …
in fastoptim's shard layout (uint16 or uint32 from the vocabulary, see shards.py).

Resumable: after every batch the open shards are fsync'd and `OUT/tokenize.json` records, atomically, the input
position (file, byte offset) and how many tokens each open shard holds. A killed run started again with the same
command truncates the open shards to those counts and continues from that position, so the shards come out as an
uninterrupted run writes them. The record also pins the tokenizer (its sha256) and the settings; resuming with
others is refused.
"""

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fastoptim.data.shards import HEADER_BYTES, shard_header, token_dtype

MANIFEST = "tokenize.json"
FORMAT = 1
PIECE_BYTES = 64 * 1024
END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
SPLITS = ("train", "val")


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"tokenizer {str(path)!r} does not load as a HF tokenizers tokenizer.json "
                         f"({type(err).__name__}: {err})") from err


def vocabulary_size(tokenizer) -> int:
    """One more than the largest id, added tokens included (Llama-3: 128,256)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def end_of_text_id(tokenizer, name: str | None, source: str) -> int:
    names = (name,) if name else END_OF_TEXT_NAMES
    for candidate in names:
        if (token := tokenizer.token_to_id(candidate)) is not None:
            return token
    wanted = f"has no token {name!r}" if name else f"has none of the end-of-text tokens {', '.join(END_OF_TEXT_NAMES)}"
    raise ValueError(f"tokenizer {source!r} {wanted}; name its document separator with --eos-token")


def split_of(name: str, val_fraction: float) -> str:
    digest = hashlib.sha1(b"validation:" + name.encode()).digest()[:8]
    return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"


def input_files(paths: list[str]) -> list[tuple[Path, str]]:
    """(file, name for the split hash) of every input, in a stable order."""
    files = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input {given!r} does not exist")
        if path.is_file():
            files.append((path.resolve(), path.name))
            continue
        found = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        files += [(p.resolve(), str(p.relative_to(path))) for p in found]
    if not files:
        raise ValueError(f"inputs {paths} hold no files")
    return files


def _complete_utf8(chunk: bytes) -> int:
    """Length of the longest prefix of `chunk` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(chunk)) + 1):
        byte = chunk[-back]
        if byte & 0xC0 != 0x80:  # the last character's first byte
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return len(chunk) - back if need > back else len(chunk)
    return len(chunk)


def is_text(path: Path) -> bool:
    """Whether a file looks like UTF-8 text: its first 8 KB hold no NUL byte and decode."""
    with open(path, "rb") as f:
        head = f.read(8192)
    head = head[:_complete_utf8(head)]
    try:
        return b"\0" not in head and bool(head.decode("utf-8").strip())
    except UnicodeDecodeError:
        return False


def documents(path: Path, name: str, offset: int, text_field: str) -> Iterator[tuple[str, str, int]]:
    """(name, text, byte offset after it) of each document of one file, from byte `offset` on."""
    with open(path, "rb") as f:
        f.seek(offset)
        if path.suffix == ".jsonl":
            while line := f.readline():
                where = f.tell()
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}: the line ending at byte {where} is not JSON ({err})") from err
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}: the line ending at byte {where} has no string field "
                                     f"{text_field!r} (set it with --text-field)")
                yield f"{name}@{where}", record[text_field], where
            return
        while piece := f.read(PIECE_BYTES):
            piece += f.readline(PIECE_BYTES)  # end the piece at a line boundary where one is near
            cut = _complete_utf8(piece)
            f.seek(cut - len(piece), os.SEEK_CUR)
            where = f.tell()
            try:
                text = piece[:cut].decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 text near byte {where - cut + err.start}; remove the file "
                                 f"from the inputs or convert it") from err
            yield f"{name}@{where}", text, where


@dataclass
class OpenShard:
    """The shard a split is appending to: `NAME.bin.partial` with a placeholder header until it closes."""
    folder: Path
    split: str
    index: int
    tokens: int = 0

    @property
    def final(self) -> Path:
        return self.folder / f"{self.split}_{self.index:06d}.bin"

    @property
    def partial(self) -> Path:
        return self.folder / f"{self.split}_{self.index:06d}.bin.partial"

    def open(self, width: int):
        """Open for appending after the committed tokens (dropping anything written after the last commit)."""
        handle = open(self.partial, "r+b" if self.partial.exists() else "w+b")
        handle.truncate(HEADER_BYTES + width * self.tokens)
        handle.seek(0, os.SEEK_END)
        return handle


class ShardWriter:
    """Appends each split's tokens to its open shard; a full shard is sealed (header, rename) at the next commit.

    A commit fsyncs the shards, then writes the manifest, then renames the sealed shards: a run killed anywhere
    leaves a manifest whose shards either exist or wait, complete, under their `.partial` name (finished on resume).
    """

    def __init__(self, folder: Path, state: dict, vocab_size: int, shard_tokens: int):
        self.folder, self.state, self.shard_tokens = folder, state, shard_tokens
        self.vocab_size, self.width = vocab_size, token_dtype(vocab_size).itemsize
        for split in SPLITS:
            for name in state["shards"][split]:
                final = folder / name
                if not final.exists():  # sealed and committed by a run killed before its rename
                    os.replace(f"{final}.partial", final)
        self.shards = {split: OpenShard(folder, split, **state["open"][split]) for split in SPLITS}
        self.handles = {split: shard.open(self.width) for split, shard in self.shards.items()}
        self.sealing: list[tuple[OpenShard, object]] = []

    def append(self, split: str, tokens: np.ndarray) -> None:
        shard = self.shards[split]
        self.handles[split].write(tokens.astype(token_dtype(self.vocab_size), copy=False).tobytes())
        shard.tokens += tokens.size
        if shard.tokens >= self.shard_tokens:
            self._seal(split)

    def _seal(self, split: str) -> None:
        shard = self.shards[split]
        self.sealing.append((shard, self.handles[split]))
        self.shards[split] = OpenShard(self.folder, split, shard.index + 1)
        self.handles[split] = self.shards[split].open(self.width)

    def commit(self, position: dict) -> None:
        for shard, handle in self.sealing:
            handle.seek(0)
            handle.write(shard_header(self.vocab_size, shard.tokens))
        for handle in [*self.handles.values(), *(handle for _, handle in self.sealing)]:
            handle.flush()
            os.fsync(handle.fileno())
        for shard, _ in self.sealing:
            self.state["shards"][shard.split].append(shard.final.name)
        self.state["open"] = {split: {"index": s.index, "tokens": s.tokens} for split, s in self.shards.items()}
        self.state["position"] = position
        write_manifest(self.folder, self.state)
        for shard, handle in self.sealing:
            handle.close()
            os.replace(shard.partial, shard.final)
        self.sealing = []

    def finish(self, position: dict) -> None:
        """Seal the last shard of each split (an empty one is dropped) and commit."""
        for split in SPLITS:
            if self.shards[split].tokens:
                self._seal(split)
        self.commit(position)
        for split in SPLITS:
            self.handles[split].close()
            self.shards[split].partial.unlink()


def write_manifest(folder: Path, state: dict) -> None:
    tmp = folder / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def tokenize(inputs: list[str], tokenizer_path: str, out: str, val_fraction: float = 0.005,
             shard_tokens: int = 100_000_000, text_field: str = "text", eos_token: str | None = None,
             batch_bytes: int = 8 << 20, progress: bool = True) -> dict:
    """Tokenize `inputs` into shards under `out` (resuming what a killed run left there); returns the manifest."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be positive")
    tokenizer = load_tokenizer(Path(tokenizer_path))
    vocab_size = vocabulary_size(tokenizer)
    eos = end_of_text_id(tokenizer, eos_token, tokenizer_path)
    files = input_files(inputs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"format": FORMAT, "tokenizer_sha256": hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest(),
                "vocab_size": vocab_size, "end_of_text": eos, "val_fraction": val_fraction,
                "shard_tokens": shard_tokens, "text_field": text_field, "inputs": [str(p) for p, _ in files]}
    state = read_manifest(folder)
    if state is not None:
        changed = [key for key, value in settings.items() if state.get(key) != value]
        if changed:
            raise ValueError(f"{folder} holds shards of another tokenization (different {', '.join(changed)}); "
                             f"choose another --out")
        if state["done"]:
            return state
    else:
        if any(folder.glob("*.bin")):
            raise ValueError(f"{folder} already holds .bin files that no tokenize run recorded; choose another --out")
        state = {**settings, "done": False, "position": {"file": 0, "offset": 0}, "documents": 0,
                 "tokens": {split: 0 for split in SPLITS}, "skipped": [],
                 "open": {split: {"index": 0, "tokens": 0} for split in SPLITS},
                 "shards": {split: [] for split in SPLITS}}
        (folder / "tokenizer.json").write_bytes(Path(tokenizer_path).read_bytes())
    writer = ShardWriter(folder, state, vocab_size, shard_tokens)
    before = np.cumsum([0] + [p.stat().st_size for p, _ in files])  # input bytes before each file
    start = state["position"]
    bar = tqdm(total=int(before[-1]), initial=int(before[start["file"]]) + start["offset"], unit="B",
               unit_scale=True, disable=not progress, desc="tokenize", dynamic_ncols=True)
    batch, batch_size = [], 0

    def flush(position: dict) -> None:
        nonlocal batch, batch_size
        encoded = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
        for (name, _), enc in zip(batch, encoded):
            split = split_of(name, val_fraction)
            tokens = np.array(enc.ids + [eos], dtype=np.int64)
            writer.append(split, tokens)
            state["tokens"][split] += tokens.size
        state["documents"] += len(batch)
        writer.commit(position)
        bar.update(int(before[position["file"]]) + position["offset"] - bar.n)
        batch, batch_size = [], 0

    for index in range(start["file"], len(files)):
        path, name = files[index]
        offset = start["offset"] if index == start["file"] else 0
        if offset == 0 and path.suffix != ".jsonl" and not is_text(path):
            state["skipped"].append(str(path))
            continue
        for doc_name, text, offset in documents(path, name, offset, text_field):
            batch.append((doc_name, text))
            batch_size += len(text)
            if batch_size >= batch_bytes:
                flush({"file": index, "offset": offset})
    end = {"file": len(files), "offset": 0}
    flush(end)
    bar.close()
    writer.finish(end)
    state["done"] = True
    write_manifest(folder, state)
    return state
