import struct
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from fastoptim.data import TrainLoader, prepare_data, validation_batches
from fastoptim.data.corpus import load_corpus, split_validation
from fastoptim.data.shards import read_shard, write_shard


def handmade_shard(path, tokens):
    """The nanoGPT .bin layout written from its description: 256 little-endian int32 header, then uint16 tokens."""
    header = [20240520, 1, len(tokens)] + [0] * 253
    path.write_bytes(struct.pack("<256i", *header) + struct.pack(f"<{len(tokens)}H", *tokens))


def test_shard_layout_matches_nanogpt(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1000).astype(np.uint16)
    handmade_shard(tmp_path / "a.bin", tokens.tolist())
    write_shard(tmp_path / "b.bin", tokens)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert np.array_equal(read_shard(tmp_path / "a.bin"), tokens)


def test_bad_shards_are_clear_errors(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x01" * 2000)
    with pytest.raises(ValueError, match="not a token shard"):
        read_shard(tmp_path / "junk.bin")
    handmade_shard(tmp_path / "short.bin", [1, 2, 3])
    (tmp_path / "short.bin").write_bytes((tmp_path / "short.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="header says 3 tokens"):
        read_shard(tmp_path / "short.bin")
    with pytest.raises(ValueError, match="does not fit"):
        write_shard(tmp_path / "big.bin", np.array([70000]))


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


def test_validation_batches_are_fixed_and_in_order():
    shards = shards_of([400])
    batches = list(validation_batches(shards, 9, 4, max_batches=100))
    assert len(batches) == 399 // 9 // 4
    flat = torch.cat([x for x, _ in batches]).flatten()
    expected = np.concatenate([shards[0][i * 9: i * 9 + 9] for i in range(len(batches) * 4)])
    assert np.array_equal(flat.numpy(), expected)
    assert list(validation_batches(shards, 9, 4, max_batches=2))[1][0].tolist() == batches[1][0].tolist()
