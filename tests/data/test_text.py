"""Character corpora: reading and checking files, the 90/10 split, random and sequential blocks."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nmsparse.data import DataConfig, build_loaders, calibration_blocks, num_classes, read_corpus, set_epoch
from nmsparse.data.text import RandomBlocks, SequentialBlocks

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def corpus_file(tmp_path, text="hello world, a tiny corpus for tests.\n" * 20, name="c.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_vocabulary_split_and_round_trip(tmp_path):
    text = "abcab\ncba!" * 30
    c = read_corpus(corpus_file(tmp_path, text))
    assert c.chars == "".join(sorted(set(text))) and c.vocab_size == 5
    assert c.decode(c.ids) == text and torch.equal(c.encode(text), c.ids)
    assert len(c.split("train")) == int(len(text) * 0.9) and len(c.split("train")) + len(c.split("val")) == len(text)
    assert torch.equal(torch.cat([c.split("train"), c.split("val")]), c.ids)


def test_non_ascii_text_is_characters_not_bytes(tmp_path):
    c = read_corpus(corpus_file(tmp_path, "naïve café — ☃\n" * 10))
    assert "☃" in c.chars and c.decode(c.ids[:15]) == "naïve café — ☃\n"


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared Tiny Shakespeare not present")
def test_tiny_shakespeare_is_65_characters_and_the_published_split():
    c = read_corpus(SHAKESPEARE)
    assert c.vocab_size == 65 and len(c.ids) == 1_115_394
    assert len(c.split("train")) == 1_003_854 and len(c.split("val")) == 111_540  # nanoGPT's shakespeare_char
    assert num_classes(DataConfig(name="tinyshakespeare", root=str(SHAKESPEARE.parents[1]))) == 65


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"abc\x00\x01\x02def" * 10, "binary"),
    ("caf\xe9 latin-1 text".encode("latin-1"), "not UTF-8"),
])
def test_bad_corpus_files_are_named(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message) as e:
        read_corpus(p)
    assert "bad.txt" in str(e.value)


def test_a_directory_is_not_a_corpus(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        read_corpus(tmp_path)


def test_block_too_long_for_the_validation_split_is_named(tmp_path):
    c = read_corpus(corpus_file(tmp_path, "x y z " * 50))  # 300 chars: 30 in validation
    with pytest.raises(ValueError, match=r"block_size 64 is too long for the validation split .*c.txt.*<= 29"):
        SequentialBlocks(c.split("val"), 64, 4, path=c.path)
    d = DataConfig(name="text", path=str(tmp_path / "c.txt"), block_size=64, steps_per_epoch=3)
    with pytest.raises(ValueError, match="block_size 64 is too long for the validation split"):
        build_loaders(d, torch.device("cpu"))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), epoch=st.integers(0, 50), block=st.integers(1, 40), batch=st.integers(1, 6))
def test_random_blocks_are_contiguous_shifted_and_reproducible(seed, epoch, block, batch):
    ids = torch.arange(500) % 37
    a = RandomBlocks(ids, block, batch, steps=4, seed=seed)
    b = RandomBlocks(ids, block, batch, steps=4, seed=seed)
    a.set_epoch(epoch), b.set_epoch(epoch)
    first, second = list(a), list(b)
    assert len(first) == 4
    for (x, y), (x2, y2), i in zip(first, second, range(4)):
        assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (batch, block)
        starts = a.starts(epoch, i)
        assert torch.equal(x, torch.stack([ids[s: s + block] for s in starts.tolist()]))
        assert torch.equal(y, torch.stack([ids[s + 1: s + block + 1] for s in starts.tolist()]))
    b.set_epoch(epoch, skip_batches=2)  # a resume inside the epoch continues with the same batches
    rest = list(b)
    assert len(rest) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(rest, first[2:]))


def test_epochs_seeds_and_ranks_draw_different_blocks():
    ids = torch.arange(10_000)
    def first(**kw):
        loader = RandomBlocks(ids, 16, 8, steps=1, **{k: v for k, v in kw.items() if k != "epoch"})
        loader.set_epoch(kw.get("epoch", 0))
        return next(iter(loader))[0]
    base = first()
    for kw in ({"seed": 1}, {"epoch": 1}, {"rank": 1}):
        assert not torch.equal(base, first(**kw))


def test_sequential_blocks_cover_the_split_once_and_a_limit_is_evenly_spaced():
    ids = torch.arange(1001)
    full = SequentialBlocks(ids, 10, 7)
    xs = torch.cat([x for x, _ in full])
    assert torch.equal(xs.flatten(), torch.arange(1000)) and len(full) == -(-100 // 7)
    part = SequentialBlocks(ids, 10, 7, limit=5)
    starts = torch.cat([x for x, _ in part])[:, 0]
    assert starts.tolist() == [0, 250, 500, 740, 990] and torch.equal(torch.cat([x for x, _ in part.full()]), xs)


def test_calibration_blocks_are_seeded_training_blocks(tmp_path):
    c = read_corpus(corpus_file(tmp_path))
    a, b = calibration_blocks(c, 6, 8, seed=3), calibration_blocks(c, 6, 8, seed=3)
    assert a.shape == (6, 8) and torch.equal(a, b)
    with pytest.raises(ValueError, match=">= 1"):
        calibration_blocks(c, 0, 8)


def test_text_config_needs_a_path_and_steps(tmp_path):
    from nmsparse.train.config import config_from_dict
    base = {"data": {"name": "text", "path": str(corpus_file(tmp_path)), "steps_per_epoch": 5},
            "model": {"name": "gpt", "kwargs": {"n_layer": 1, "n_embd": 16, "n_head": 2}}}
    config_from_dict(base)
    with pytest.raises(ValueError, match="data.path is required"):
        config_from_dict({**base, "data": {"name": "text", "steps_per_epoch": 5}})
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1 for text"):
        config_from_dict({**base, "data": {"name": "text", "path": "x.txt"}})


def test_loaders_of_a_text_config(tmp_path):
    d = DataConfig(name="text", path=str(corpus_file(tmp_path)), block_size=8, batch_size=3, steps_per_epoch=4,
                   test_batch_size=5)
    train, test = build_loaders(d, torch.device("cpu"), seed=1)
    set_epoch(train, 2, 1)
    assert len(list(train)) == 3 and len(train) == 4
    x, y = next(iter(test))
    assert x.shape == (5, 8) and x.dtype == torch.int64 and torch.equal(x[0, 1:], y[0, :-1])
