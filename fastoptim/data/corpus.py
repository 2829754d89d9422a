"""Where the training text comes from: the embedded default corpus, or the user's own text files.

The default corpus is the Python standard library's own source (`sysconfig.get_paths()['stdlib']`, outside its test
folders). It is the one real corpus present wherever Python runs, with no download and no system package, so a fresh
or air-gapped machine can train out of the box. It is real text of a kind the paper's mix contains (StarCoderData is
~6% of it): code with English docstrings and comments. It is a CPU-scale corpus: about 12 MB of source, 3.4 M tokens
at the default 4096-token BPE; GPU-scale runs need the user's own data (text files, or token shards, see shards.py).

Every source is cut into documents (a file, or ~64 KB pieces of a large file at line boundaries) so that the held-out
validation split can be chosen per document, by a hash of its name: deterministic and independent of file order.
"""

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

PIECE_BYTES = 64 * 1024
STDLIB_SPEC = "stdlib"


@dataclass(frozen=True)
class Document:
    name: str
    text: str

    @property
    def split_hash(self) -> int:
        # Salted so that it is independent of the (unsalted) hash order in which a size cap picks files.
        return int.from_bytes(hashlib.sha1(b"validation:" + self.name.encode()).digest()[:8], "big")


def _stable_order(paths: list[Path], root: Path) -> list[Path]:
    # Hash order spreads a size cap over the whole library instead of taking modules alphabetically.
    return sorted(paths, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).digest())


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped_dirs = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skipped_dirs and "test" not in d)
        files += [Path(folder) / n for n in names if n.endswith(".py") and "test" not in n]
    return root, _stable_order(files, root)


def user_files(path: Path) -> tuple[Path, list[Path]]:
    if path.is_file():
        return path.parent, [path]
    files = [p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    return path, _stable_order(files, path)


def _split_into_pieces(name: str, text: str) -> list[Document]:
    if len(text) <= PIECE_BYTES:
        return [Document(name, text)]
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + PIECE_BYTES)
        end = len(text) if end < 0 else end + 1
        pieces.append(Document(f"{name}#{len(pieces)}", text[start:end]))
        start = end
    return pieces


def read_documents(root: Path, files: list[Path], max_bytes: int | None) -> list[Document]:
    """Documents from files in the given order until max_bytes of text (None: all); files that are not UTF-8 text
    are skipped."""
    docs, total = [], 0
    max_bytes = float("inf") if max_bytes is None else max_bytes
    for path in files:
        if total >= max_bytes:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if total + len(text) > max_bytes:
            text = text[: int(max_bytes - total)]
        total += len(text)
        docs += _split_into_pieces(str(path.relative_to(root)), text)
    return docs


def load_corpus(sources: list[str], max_bytes: int | None = None) -> list[Document]:
    """Documents of the named sources: "stdlib" or paths to text files / directories (checked to exist); at most
    max_bytes of text in all (None: everything), shared equally between the sources."""
    per_source = None if max_bytes is None else max_bytes // len(sources)
    docs = []
    for source in sources:
        if source == STDLIB_SPEC:
            root, files = stdlib_files()
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"data: path {source!r} does not exist")
            root, files = user_files(path)
        found = read_documents(root, files, per_source)
        if not found:
            raise ValueError(f"data: {source!r} holds no UTF-8 text")
        docs += found
    return docs


def split_validation(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val): documents in the order of their name's hash go to validation until they hold val_fraction of
    the text (at least one document), the rest to training; both keep the corpus order."""
    if len(docs) < 2:
        raise ValueError("data: the corpus is a single small document; it cannot hold out a validation split")
    target = val_fraction * sum(len(d.text) for d in docs)
    held_out, size = set(), 0
    for doc in sorted(docs, key=lambda d: d.split_hash):
        if held_out and size >= target:
            break
        held_out.add(doc.name)
        size += len(doc.text)
    train = [d for d in docs if d.name not in held_out]
    if not train:
        raise ValueError(f"data: val_fraction={val_fraction} leaves no training documents")
    return train, [d for d in docs if d.name in held_out]
