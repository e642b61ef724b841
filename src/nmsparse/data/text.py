"""Character-level text corpora for language models: read and check a plain-text file, split it 90/10, and batch
random contiguous blocks (train) or every block in order (validation), as nanoGPT's ``shakespeare_char`` does.

The vocabulary is the sorted set of characters of the whole file, so a model's classes do not depend on the
split. Train batches depend only on (seed, epoch, batch index, rank): a resumed or distributed run reads the
same blocks as an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

SHAKESPEARE_FILE = ("tinyshakespeare", "input.txt")
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
HOW_TO_SHAKESPEARE = ("Tiny Shakespeare is tinyshakespeare/input.txt under the data folder (the shared data "
                      "folder ../shared/data beside the checkout holds it; or set NMSPARSE_DATA, or pass data.root); "
                      "it is data/tinyshakespeare/input.txt of the public karpathy/char-rnn repository")


@dataclass(frozen=True)
class CharCorpus:
    """A text file as character ids: `ids` (int64, the whole file), `chars` (id -> character), the 90/10 split."""
    path: str
    chars: str
    ids: Tensor
    val_fraction: float = 0.1

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def split_at(self) -> int:
        return int(len(self.ids) * (1 - self.val_fraction))

    def split(self, name: str) -> Tensor:
        """The ids of the "train" (first 90%) or "val" (last 10%) part."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.ids[: self.split_at] if name == "train" else self.ids[self.split_at:]

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"characters {''.join(missing)!r} are not in the vocabulary of {self.path}")
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def read_corpus(path: str | Path, val_fraction: float = 0.1) -> CharCorpus:
    """Read and check a UTF-8 text file: missing, empty, binary or non-UTF-8 files are errors naming the file."""
    return _read_corpus(str(Path(path).expanduser().resolve()), float(val_fraction))


@functools.lru_cache(maxsize=4)
def _read_corpus(path: str, val_fraction: float) -> CharCorpus:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"text corpus {p} does not exist: give data.path (data.name: text) the path of a "
                                f"UTF-8 text file, or use data.name: tinyshakespeare")
    if not p.is_file():
        raise ValueError(f"text corpus {p} is not a file: give the path of a UTF-8 text file")
    raw = p.read_bytes()
    if not raw.strip():
        raise ValueError(f"text corpus {p} is empty: a language model needs a file of text to train on")
    if b"\x00" in raw[:1 << 20]:
        raise ValueError(f"text corpus {p} looks binary (it holds NUL bytes): give a plain UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text corpus {p} is not UTF-8 (byte {e.start} is invalid): convert it, e.g. "
                         f"iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8.txt") from None
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
    chars = "".join(sorted(set(text)))
    lut = np.zeros(max(map(ord, chars)) + 1, dtype=np.int64)
    lut[[ord(c) for c in chars]] = np.arange(len(chars))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return CharCorpus(str(p), chars, torch.from_numpy(lut[codes]), val_fraction)


def shakespeare_path(root: str | Path) -> Path:
    return Path(root) / SHAKESPEARE_FILE[0] / SHAKESPEARE_FILE[1]


def check_md5(path: Path, expected: str = SHAKESPEARE_MD5) -> None:
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != expected:
        raise ValueError(f"{path} has MD5 {digest}, not the published file's {expected}")


def _check_blocks(ids: Tensor, block: int, what: str, path: str) -> None:
    if len(ids) < block + 1:
        raise ValueError(f"data.block_size {block} is too long for the {what} split of {path} ({len(ids)} "
                         f"characters; a block needs block_size + 1): use block_size <= {max(len(ids) - 1, 0)} "
                         f"or a longer corpus")


def _block_generator(seed: int, epoch: int, batch: int, rank: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, batch, rank, 7]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


class RandomBlocks:
    """Train batches: `steps` batches per epoch of `batch_size` random contiguous blocks (x, y = x shifted by one)."""

    def __init__(self, ids: Tensor, block: int, batch_size: int, steps: int, *, seed: int = 0, rank: int = 0,
                 device=None, path: str = "corpus"):
        _check_blocks(ids, block, "train", path)
        self.device = torch.device(device) if device is not None else ids.device
        self.ids, self.block, self.batch_size, self.steps = ids.to(self.device), block, batch_size, steps
        self.seed, self.rank, self.epoch, self._skip = seed, rank, 0, 0
        self._offsets = torch.arange(block + 1, device=self.device)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self._skip = epoch, skip_batches

    def __len__(self) -> int:
        return self.steps

    def starts(self, epoch: int, batch: int) -> Tensor:
        """The first character of each block of one batch: a function of seed, epoch, batch index and rank."""
        g = _block_generator(self.seed, epoch, batch, self.rank)
        return torch.randint(len(self.ids) - self.block, (self.batch_size,), generator=g).to(self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        skip, self._skip = self._skip, 0
        for b in range(skip, self.steps):
            chunk = self.ids[self.starts(self.epoch, b)[:, None] + self._offsets]
            yield chunk[:, :-1], chunk[:, 1:]


class SequentialBlocks:
    """Validation batches: the whole non-overlapping blocks of the split in order, or `limit` of them evenly spaced
    over it (the same ones every time); `full()` is the loader over all of them."""

    def __init__(self, ids: Tensor, block: int, batch_size: int, *, limit: int = 0, device=None,
                 path: str = "corpus"):
        _check_blocks(ids, block, "validation", path)
        self.device = torch.device(device) if device is not None else ids.device
        self.ids, self.block, self.path, self.limit = ids, block, path, limit
        n = (len(ids) - 1) // block
        x, y = ids[: n * block].view(n, block), ids[1: n * block + 1].view(n, block)
        if 0 < limit < n:
            keep = torch.linspace(0, n - 1, limit).round().long()
            x, y = x[keep], y[keep]
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size = batch_size

    def full(self) -> "SequentialBlocks":
        if not self.limit:
            return self
        return SequentialBlocks(self.ids, self.block, self.batch_size, device=self.device, path=self.path)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i: i + self.batch_size], self.y[i: i + self.batch_size]


def calibration_blocks(corpus: CharCorpus, n: int, block: int, seed: int = 0) -> Tensor:
    """n random training blocks (n x block ids) for one-shot pruning, from a seeded generator."""
    if n < 1:
        raise ValueError(f"the number of calibration sequences must be >= 1, got {n}")
    ids = corpus.split("train")
    _check_blocks(ids, block, "train", corpus.path)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(ids) - block, (n,), generator=g)
    return ids[starts[:, None] + torch.arange(block)]
