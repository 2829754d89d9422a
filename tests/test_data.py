import hashlib
import json
import struct
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from fastoptim.data import TrainLoader, data_capacity, eval_set, prepare_data, prepare_eval_data
from fastoptim.data.cli import inspect
from fastoptim.data.cli import main as data_main
from fastoptim.data.corpus import load_corpus, split_validation
from fastoptim.data.shards import read_header, read_shard, write_shard
from fastoptim.data.tokenize import tokenize


def handmade_shard(path, tokens):
    """The llm.c / modded-nanogpt .bin layout written from its description: 256 little-endian int32 header, then
    uint16 tokens."""
    header = [20240520, 1, len(tokens)] + [0] * 253
    path.write_bytes(struct.pack("<256i", *header) + struct.pack(f"<{len(tokens)}H", *tokens))


def handmade_fastoptim_shard(tokens, vocab):
    """fastoptim's layout from its description: magic, version, bytes per token, vocabulary, int64 count."""
    width = 2 if vocab <= 65536 else 4
    header = struct.pack("<4iq", 0x464F5348, 1, width, vocab, len(tokens)) + bytes(1024 - 24)
    return header + struct.pack(f"<{len(tokens)}{'H' if width == 2 else 'I'}", *tokens)


@pytest.mark.parametrize("vocab", [65536, 65537, 128256])
def test_shard_layout_follows_its_description(tmp_path, vocab):
    tokens = np.random.default_rng(vocab).integers(0, vocab, size=1000)
    tokens[0] = vocab - 1
    write_shard(tmp_path / "a.bin", tokens, vocab)
    assert (tmp_path / "a.bin").read_bytes() == handmade_fastoptim_shard(tokens.tolist(), vocab)
    info = read_header(tmp_path / "a.bin")
    assert (info.layout, info.vocab_size, info.tokens) == ("fastoptim", vocab, 1000)
    assert info.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert np.array_equal(read_shard(tmp_path / "a.bin"), tokens)


def test_llmc_shards_still_load(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1000).astype(np.uint16)
    handmade_shard(tmp_path / "a.bin", tokens.tolist())
    assert np.array_equal(read_shard(tmp_path / "a.bin"), tokens)
    assert read_header(tmp_path / "a.bin").vocab_size is None


def test_bad_shards_are_clear_errors(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x01" * 2000)
    with pytest.raises(ValueError, match="junk.bin: not a token shard"):
        read_shard(tmp_path / "junk.bin")
    handmade_shard(tmp_path / "short.bin", [1, 2, 3])
    (tmp_path / "short.bin").write_bytes((tmp_path / "short.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="short.bin: header says 3 tokens"):
        read_shard(tmp_path / "short.bin")
    (tmp_path / "wide.bin").write_bytes(handmade_fastoptim_shard([1, 2], 1000)[:8] + struct.pack("<i", 4)
                                        + handmade_fastoptim_shard([1, 2], 1000)[12:])
    with pytest.raises(ValueError, match="wide.bin: corrupt header"):
        read_shard(tmp_path / "wide.bin")
    with pytest.raises(ValueError, match="token id 70000 is outside the vocabulary of 65,536"):
        write_shard(tmp_path / "big.bin", np.array([70000]), 65536)


def test_stdlib_corpus_is_capped_and_skips_tests():
    docs = load_corpus(["stdlib"], max_bytes=300_000)
    total = sum(len(d.text) for d in docs)
    assert 250_000 < total <= 300_000
    assert not any("test" in d.name for d in docs)
    root = Path(sysconfig.get_paths()["stdlib"])
    first = docs[0].name.split("#")[0]
    assert (root / first).read_text(encoding="utf-8").startswith(docs[0].text[:1000])


def test_validation_split_is_deterministic_disjoint_and_by_name():
    docs = load_corpus(["stdlib"], max_bytes=400_000)
    train, val = split_validation(docs, 0.1)
    train2, val2 = split_validation(list(reversed(docs)), 0.1)
    assert {d.name for d in val} == {d.name for d in val2} and val
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert len(train) + len(val) == len(docs)
    total = sum(len(d.text) for d in docs)
    held = sum(len(d.text) for d in val)
    assert held >= 0.1 * total and held - max(len(d.text) for d in val) < 0.1 * total


def write_text_corpus(folder):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "the", "of", "and", "optimizer"]
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(60)) + "\n"
        (folder / f"doc{i}.txt").write_text(text)


def test_user_text_is_tokenized_cached_and_decodes_back(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_text_corpus(corpus)
    data = prepare_data(str(corpus), cache_dir=tmp_path / "cache", vocab_size=300, val_fraction=0.2)
    (folder,) = (tmp_path / "cache").iterdir()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    train_docs, val_docs = split_validation(load_corpus([str(corpus)], 4_000_000), 0.2)
    for split, docs in ((data.train[0], train_docs), (data.val[0], val_docs)):
        pieces = tokenizer.decode(split.tolist(), skip_special_tokens=False).split("<|endoftext|>")
        assert pieces[:-1] == [d.text for d in docs] and pieces[-1] == ""
    assert data.vocab_size == 300
    mtime = (folder / "train.bin").stat().st_mtime_ns
    again = prepare_data(str(corpus), cache_dir=tmp_path / "cache", vocab_size=300, val_fraction=0.2)
    assert (folder / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(again.train[0], data.train[0])


def test_bin_shards_are_used_as_they_are(tmp_path):
    handmade_shard(tmp_path / "fineweb_train_000001.bin", list(range(500)))
    handmade_shard(tmp_path / "fineweb_train_000002.bin", list(range(500, 900)))
    handmade_shard(tmp_path / "fineweb_val_000000.bin", list(range(100)))
    data = prepare_data(str(tmp_path))
    assert [s.size for s in data.train] == [500, 400] and data.val[0].size == 100
    assert data.vocab_size == 65536


def test_missing_paths_and_missing_val_shards_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_data(str(tmp_path / "nowhere"))
    handmade_shard(tmp_path / "train.bin", [1, 2, 3])
    with pytest.raises(ValueError, match="validation"):
        prepare_data(str(tmp_path / "train.bin"))


def shards_of(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60000, size=n).astype(np.uint16) for n in sizes]


def test_loader_covers_every_window_once_per_epoch_and_targets_shift():
    shards = shards_of([333, 150])
    seq_len, batch = 8, 4
    windows = {tuple(s[i * seq_len: i * seq_len + seq_len + 1].tolist())
               for s in shards for i in range((s.size - 1) // seq_len)}
    loader = TrainLoader(shards, seq_len, batch, seed=3)
    seen = []
    for _ in range(loader.batches_per_epoch):
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (batch, seq_len)
        assert torch.equal(x[:, 1:], y[:, :-1])
        seen += [tuple(x[r].tolist()) + (int(y[r, -1]),) for r in range(batch)]
    assert len(seen) == len(set(seen)) == loader.batches_per_epoch * batch
    assert set(seen) <= windows and len(windows) - len(seen) < batch


def test_loader_is_seeded_and_resumes_from_its_state():
    shards = shards_of([2000])
    a = TrainLoader(shards, 16, 6, seed=1)
    b = TrainLoader(shards, 16, 6, seed=2)
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])
    a = TrainLoader(shards, 16, 6, seed=1)
    for _ in range(25):  # crosses an epoch boundary (20 batches per epoch)
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    resumed = TrainLoader(shards, 16, 6, seed=1)
    resumed.load_state_dict(state)
    for x, y in expected:
        got = resumed.next_batch()
        assert torch.equal(got[0], x) and torch.equal(got[1], y)
    with pytest.raises(ValueError, match="seq_len=16 in the checkpoint, 8 here"):
        TrainLoader(shards, 8, 6, seed=1).load_state_dict(state)


def test_ranks_split_the_global_batch():
    shards = shards_of([3000])
    whole = TrainLoader(shards, 10, 8, seed=0)
    parts = [TrainLoader(shards, 10, 8, seed=0, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        x, y = whole.next_batch()
        local = [p.next_batch() for p in parts]
        assert torch.equal(torch.cat([l[0] for l in local]), x)
        assert torch.equal(torch.cat([l[1] for l in local]), y)
    with pytest.raises(ValueError, match=r"batch_size=6 must be a positive multiple .*world_size=4"):
        TrainLoader(shards, 10, 6, seed=0, rank=0, world_size=4)


def test_token_budget_is_checked_and_repeating_is_announced():
    loader = TrainLoader(shards_of([1001]), 10, 5, seed=0)  # 100 windows: 20 batches per pass
    assert loader.check_budget(20, allow_repeat=False) is None
    with pytest.raises(ValueError, match="needs 1,050 training tokens"):
        loader.check_budget(21, allow_repeat=False)
    assert "2.00 passes" in loader.check_budget(40, allow_repeat=True)


def test_eval_set_is_fixed_windows_split_over_ranks_without_loss():
    shards = shards_of([400, 150])
    evals = eval_set(shards, 9, 9 * 50, "the test shards")
    assert evals.windows.shape == (50, 10) and evals.tokens == 450
    expected = [shards[0][i * 9: i * 9 + 10] for i in range(44)] + [shards[1][i * 9: i * 9 + 10] for i in range(6)]
    assert np.array_equal(evals.windows, np.stack(expected))
    assert evals.sha256 == hashlib.sha256(np.stack(expected).astype("<i8").tobytes()).hexdigest()
    assert eval_set(shards, 9, 9 * 50 + 8, "x").sha256 == evals.sha256  # rounded down to whole windows
    for world, micro in ((1, 50), (1, 7), (3, 4), (4, 5)):
        per_rank = [list(evals.batches(micro, rank, world)) for rank in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1  # same number of forwards on every rank
        counted = [(x, y) for batches in per_rank for x, y, rows in batches for _ in [0] if rows]
        rows = sorted(tuple(torch.cat([x, y[:, -1:]], 1)[r].tolist()) for x, y in counted for r in range(len(x)))
        assert rows == sorted(tuple(w) for w in evals.windows.tolist())
        assert all(x.shape[0] <= micro and torch.equal(x[:, 1:], y[:, :-1]) for x, y in counted)
    with pytest.raises(ValueError, match=r"eval_tokens=9,000 needs 1,000 windows of 10 tokens but the test "
                                         r"shards holds 60"):
        eval_set(shards, 9, 9000, "the test shards")
    with pytest.raises(ValueError, match="eval_tokens=5 must be at least one sequence of seq_len=9"):
        eval_set(shards, 9, 5, "x")


def word_tokenizer(path, vocab):
    """A word-level tokenizer with ids 0..vocab-1 (w0 … w{vocab-2}, then the end-of-text), saved as JSON."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 1)}
    tokenizer = Tokenizer(models.WordLevel({**words, "<|endoftext|>": vocab - 1}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def random_word_corpus(folder, vocab, rng, files=6, lines=40):
    """.jsonl files of one-line documents of 9 random words, the first beyond uint16; returns each file's ids."""
    folder.mkdir()
    ids = []
    for f in range(files):
        rows = rng.integers(0, vocab - 1, size=(lines, 9))
        rows[:, 0] = rng.integers(65536, vocab - 1, size=lines)
        records = [json.dumps({"text": " ".join(f"w{i}" for i in row)}) for row in rows]
        (folder / f"doc{f}.jsonl").write_text("\n".join(records) + "\n")
        ids.append(rows)
    return ids


def documents_of(stream, end_of_text):
    ends = np.flatnonzero(stream == end_of_text)
    return [tuple(doc) for doc in np.split(stream, ends + 1)[:-1]]


def test_uint32_shards_round_trip_tokenize_inspect_loader(tmp_path, capsys):
    vocab = 70_000
    rng = np.random.default_rng(1)
    ids = random_word_corpus(tmp_path / "text", vocab, rng)
    tokenizer = word_tokenizer(tmp_path / "words.json", vocab)
    assert data_main(["tokenize", "--tokenizer", str(tokenizer), "--out", str(tmp_path / "shards"),
                      "--val-fraction", "0.3", "--shard-tokens", "500", "--no-progress", str(tmp_path / "text")]) == 0
    assert "vocabulary 70,000" in capsys.readouterr().out
    assert data_main(["inspect", str(tmp_path / "shards"), "--scan"]) == 0
    report = capsys.readouterr().out
    assert "uint32" in report and "70,000" in report and "max id" in report and "val:" in report
    data = prepare_data(str(tmp_path / "shards"))
    assert data.vocab_size == vocab and data.tokenizer == tmp_path / "shards" / "tokenizer.json"
    assert all(s.dtype == np.uint32 for s in data.train + data.val) and len(data.train) > 1
    # Every document comes back whole, once, in input order within its split, followed by the end-of-text id.
    expected = [tuple(row.tolist() + [vocab - 1]) for rows in ids for row in rows]
    train_docs, val_docs = (documents_of(np.concatenate(split).astype(np.int64), vocab - 1)
                            for split in (data.train, data.val))
    assert sorted(train_docs + val_docs) == sorted(expected)
    assert 0.15 < len(val_docs) / len(expected) < 0.45
    for docs in (train_docs, val_docs):
        positions = [expected.index(doc) for doc in docs]
        assert positions == sorted(positions)
    x, y = TrainLoader(data.train, 8, 4, seed=0).next_batch()
    assert x.dtype == torch.int64 and int(x.max()) >= 65536 and torch.equal(x[:, 1:], y[:, :-1])


def test_tokenize_resumes_after_a_kill_as_if_never_stopped(tmp_path, monkeypatch):
    vocab = 70_000
    random_word_corpus(tmp_path / "text", vocab, np.random.default_rng(2), files=8)
    tokenizer = word_tokenizer(tmp_path / "words.json", vocab)
    options = dict(val_fraction=0.25, shard_tokens=700, batch_bytes=2000, progress=False)
    whole = tokenize([str(tmp_path / "text")], str(tokenizer), str(tmp_path / "whole"), **options)
    assert whole["done"] and len(whole["shards"]["train"]) > 2

    import fastoptim.data.tokenize as tok

    real_append, appended = tok.ShardWriter.append, []

    def dying_append(self, split, tokens):
        appended.append(1)
        real_append(self, split, tokens)
        if len(appended) == 130:
            raise KeyboardInterrupt  # killed between two commits: tokens written that no commit recorded

    monkeypatch.setattr(tok.ShardWriter, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        tokenize([str(tmp_path / "text")], str(tokenizer), str(tmp_path / "cut"), **options)
    monkeypatch.setattr(tok.ShardWriter, "append", real_append)
    assert any(p.suffix == ".partial" for p in (tmp_path / "cut").iterdir())
    assert not tok.read_manifest(tmp_path / "cut")["done"]
    with pytest.raises(ValueError, match="still being tokenized"):
        prepare_data(str(tmp_path / "cut"))
    resumed = tokenize([str(tmp_path / "text")], str(tokenizer), str(tmp_path / "cut"), **options)
    assert resumed["shards"] == whole["shards"] and resumed["tokens"] == whole["tokens"]
    for name in whole["shards"]["train"] + whole["shards"]["val"]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    names = [sorted(p.name for p in (tmp_path / run).iterdir()) for run in ("cut", "whole")]
    assert names[0] == names[1]
    with pytest.raises(ValueError, match="another tokenization .*val_fraction"):
        tokenize([str(tmp_path / "text")], str(tokenizer), str(tmp_path / "cut"), **{**options, "val_fraction": 0.5})


def test_tokenize_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("w1 w2\n")
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    assert data_main(["tokenize", "--tokenizer", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o"),
                      str(tmp_path / "text")]) == 2
    assert "bad.json' does not load as a HF tokenizers tokenizer.json" in capsys.readouterr().err
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"w1": 0, "w2": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="has none of the end-of-text tokens"):
        tokenize([str(tmp_path / "text")], str(tmp_path / "noeos.json"), str(tmp_path / "o"), progress=False)
    (tmp_path / "docs.jsonl").write_text('{"text": "w1"}\n{"body": "w2"}\n')
    with pytest.raises(ValueError, match="docs.jsonl: the line ending at byte 30 has no string field 'text'"):
        tokenize([str(tmp_path / "docs.jsonl")], str(word_tokenizer(tmp_path / "w.json", 10)), str(tmp_path / "j"),
                 progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tokenize([str(tmp_path / "nowhere")], str(tmp_path / "w.json"), str(tmp_path / "n"), progress=False)


def test_tokenize_reads_jsonl_documents_and_skips_binary_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text('{"text": "w1 w2"}\n\n{"text": "w3"}\n')
    (tmp_path / "in" / "image.png").write_bytes(b"\x89PNG\x00\x01\x02")
    state = tokenize([str(tmp_path / "in")], str(word_tokenizer(tmp_path / "w.json", 10)), str(tmp_path / "o"),
                     val_fraction=0.0, progress=False)
    assert state["documents"] == 2 and state["skipped"] == [str((tmp_path / "in" / "image.png").resolve())]
    assert read_shard(tmp_path / "o" / "train_000000.bin").tolist() == [1, 2, 9, 3, 9]


def test_vocabulary_checks_name_the_shard(tmp_path):
    handmade_shard(tmp_path / "train_a.bin", [1, 2, 3000])
    handmade_shard(tmp_path / "val_a.bin", [1, 2, 3])
    assert prepare_data(str(tmp_path), vocab_size=3001).vocab_size == 3001
    with pytest.raises(ValueError, match=r"train_a.bin: token id 3,000 is beyond vocab_size=2,000"):
        prepare_data(str(tmp_path), vocab_size=2000)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_shard(mixed / "train.bin", np.arange(10), 100)
    write_shard(mixed / "val.bin", np.arange(10), 200)
    with pytest.raises(ValueError, match=r"shards of different vocabularies \(\[100, 200\]\)"):
        prepare_data(str(mixed))
    (mixed / "val.bin").unlink()
    write_shard(mixed / "val.bin", np.arange(10), 100)
    with pytest.raises(ValueError, match=r"train.bin: its ids span a vocabulary of 100, beyond vocab_size=50"):
        prepare_data(str(mixed), vocab_size=50)


def test_capacity_is_exact_for_shards_and_an_upper_bound_for_untokenized_text(tmp_path):
    handmade_shard(tmp_path / "train_a.bin", list(range(500)))
    handmade_shard(tmp_path / "val_a.bin", list(range(70)))
    capacity = data_capacity(str(tmp_path))
    assert (capacity.train, capacity.val, capacity.exact) == ((500,), (70,), True)
    assert capacity.windows("train", 10) == 49 and capacity.windows("val", 10) == 6
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_text_corpus(corpus)
    bound = data_capacity(str(corpus), cache_dir=tmp_path / "cache", vocab_size=300, val_fraction=0.2)
    assert not bound.exact
    data = prepare_data(str(corpus), cache_dir=tmp_path / "cache", vocab_size=300, val_fraction=0.2)
    exact = data_capacity(str(corpus), cache_dir=tmp_path / "cache", vocab_size=300, val_fraction=0.2)
    assert (exact.train_tokens, exact.val_tokens, exact.exact) == (data.train[0].size, data.val[0].size, True)
    assert bound.train_tokens >= exact.train_tokens and bound.val_tokens >= exact.val_tokens


def test_eval_data_of_its_own(tmp_path):
    corpus, held_out = tmp_path / "corpus", tmp_path / "eval"
    corpus.mkdir()
    held_out.mkdir()
    write_text_corpus(corpus)
    (held_out / "e.txt").write_text("alpha beta gamma delta\n" * 50)
    data = prepare_data(str(corpus), cache_dir=tmp_path / "cache", vocab_size=300)
    tokens, description = prepare_eval_data(str(held_out), data, cache_dir=tmp_path / "cache")
    tokenizer = Tokenizer.from_file(str(data.tokenizer))
    assert tokenizer.decode(tokens[0].tolist(), skip_special_tokens=False) == "alpha beta gamma delta\n" * 50 + \
        "<|endoftext|>"
    write_shard(tmp_path / "other.bin", np.arange(10), 400)
    with pytest.raises(ValueError, match="its ids span a vocabulary of 400, beyond vocab_size=300"):
        prepare_eval_data(str(tmp_path / "other.bin"), data)
    handmade_shard(tmp_path / "train_x.bin", [1, 2, 3])
    handmade_shard(tmp_path / "val_x.bin", [1, 2, 3])
    shards_only = prepare_data(f"{tmp_path / 'train_x.bin'},{tmp_path / 'val_x.bin'}")
    with pytest.raises(ValueError, match="the training data's tokenizer is unknown"):
        prepare_eval_data(str(held_out), shards_only)
