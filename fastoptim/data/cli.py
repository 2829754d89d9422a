"""`fastoptim data`: make token shards from text with any HF tokenizer, and look inside shards.

    fastoptim data tokenize --tokenizer llama3/tokenizer.json --out shards/dclm corpus/*.jsonl
    fastoptim data inspect shards/dclm [--scan]

A tokenize run that is killed continues where it stopped when given the same command again.
"""

import argparse
import sys
from pathlib import Path

from fastoptim.data.shards import max_token, read_header, read_shard
from fastoptim.data.tokenize import read_manifest, tokenize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastoptim data", description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)
    t = commands.add_parser("tokenize", help="text files or folders into token shards (streaming, resumable)")
    t.add_argument("inputs", nargs="+", metavar="FILES/FOLDERS",
                   help=".jsonl (one document per line) or text files, or folders of them")
    t.add_argument("--tokenizer", required=True, help="a HF tokenizers tokenizer.json (e.g. Llama-3's)")
    t.add_argument("--out", required=True, help="folder for the shards (train_*.bin, val_*.bin, tokenize.json)")
    t.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out for validation")
    t.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    t.add_argument("--text-field", default="text", help="the text's field in .jsonl records")
    t.add_argument("--eos-token", help="document separator (default: the tokenizer's end-of-text token)")
    t.add_argument("--no-progress", action="store_true")
    i = commands.add_parser("inspect", help="dtype, vocabulary and token counts of shards")
    i.add_argument("path", help="a folder of .bin shards, or one shard")
    i.add_argument("--scan", action="store_true", help="also read every token for the largest id")
    return p


def inspect(path: str, scan: bool = False, stream=None) -> None:
    stream = stream or sys.stdout
    folder = Path(path)
    files = sorted(folder.glob("*.bin")) if folder.is_dir() else [folder]
    if not files:
        raise ValueError(f"{path}: no .bin shards")
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None and not manifest["done"]:
        stream.write(f"{path}: tokenization not finished (run the same `fastoptim data tokenize` to continue)\n")
    totals: dict[str, int] = {}
    rows = []
    for file in files:
        info = read_header(file)
        split = "val" if "val" in file.name else "train"
        totals[split] = totals.get(split, 0) + info.tokens
        vocab = "-" if info.vocab_size is None else f"{info.vocab_size:,}"
        row = [file.name, split, info.layout, info.dtype.name, vocab, f"{info.tokens:,}"]
        if scan:
            row.append(f"{max_token(read_shard(file)):,}")
        rows.append(row)
    header = ["shard", "split", "layout", "dtype", "vocabulary", "tokens"] + (["max id"] if scan else [])
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        stream.write("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
    stream.write(", ".join(f"{split}: {count:,} tokens" for split, count in sorted(totals.items())) + "\n")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tokenize":
            state = tokenize(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction,
                             shard_tokens=args.shard_tokens, text_field=args.text_field, eos_token=args.eos_token,
                             progress=not args.no_progress)
            print(f"{args.out}: {state['documents']:,} documents, {state['tokens']['train']:,} train and "
                  f"{state['tokens']['val']:,} val tokens, vocabulary {state['vocab_size']:,}")
            for skipped in state["skipped"]:
                print(f"skipped (not UTF-8 text): {skipped}")
        else:
            inspect(args.path, args.scan)
    except (ValueError, FileNotFoundError) as err:
        print(f"fastoptim data: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
