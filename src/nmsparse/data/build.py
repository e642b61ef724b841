"""Train and test loaders for a data config: in-memory tensors on the device, or an image folder."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import DataConfig
from .datasets import NUM_CLASSES, STATS, TEXT_DATASETS, default_data_root, load_dataset
from .imagefolder import ImageFolder, imagefolder_loader
from .loader import TensorLoader
from .text import HOW_TO_SHAKESPEARE, CharCorpus, RandomBlocks, SequentialBlocks, read_corpus, shakespeare_path


def text_corpus(d: DataConfig) -> CharCorpus:
    """The corpus of a text data config: data.path for "text", <root>/tinyshakespeare/input.txt otherwise."""
    if d.name == "text":
        if not d.path:
            raise ValueError("data.name: text needs data.path, the UTF-8 text file to train on "
                             "(or data.name: tinyshakespeare for the shared corpus)")
        return read_corpus(d.path, d.val_fraction)
    if d.root is None:
        try:
            root = default_data_root()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. {HOW_TO_SHAKESPEARE}") from None
    else:
        root = Path(d.root)
    path = shakespeare_path(root)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. {HOW_TO_SHAKESPEARE}")
    return read_corpus(path, d.val_fraction)


def num_classes(d: DataConfig) -> int:
    """The classes a model of this data predicts: the dataset's classes, or a text corpus's vocabulary size."""
    return text_corpus(d).vocab_size if d.name in TEXT_DATASETS else NUM_CLASSES[d.name]


def build_loaders(d: DataConfig, device: torch.device, *, seed: int = 0, channels_last: bool = False,
                  rank: int = 0, world: int = 1):
    """(train, test) loaders; small datasets live on the device as uint8 tensors, normalised per batch; text
    corpora as character ids (random blocks to train, every block of the validation split to test)."""
    if d.name in TEXT_DATASETS:
        corpus = text_corpus(d)
        if d.steps_per_epoch < 1:
            raise ValueError(f"config.data.steps_per_epoch must be >= 1 for text data (the random-block batches "
                             f"between evaluations, e.g. 250), got {d.steps_per_epoch}")
        train = RandomBlocks(corpus.split("train"), d.block_size, d.batch_size, d.steps_per_epoch, seed=seed,
                             rank=rank, device=device, path=corpus.path)
        return train, SequentialBlocks(corpus.split("val"), d.block_size, d.test_batch_size, limit=d.val_blocks,
                                       device=device, path=corpus.path)
    if d.name == "imagefolder":
        train = ImageFolder(load_dataset("imagefolder", d.root, "train").root, "train", d.image_size)
        test = ImageFolder(train.root, "val", d.image_size)
        return (imagefolder_loader(train, d.batch_size, workers=d.workers, seed=seed, rank=rank, world_size=world),
                imagefolder_loader(test, d.test_batch_size, workers=d.workers, shuffle=False))
    mean, std = STATS[d.name]
    common = dict(device=device, channels_last=channels_last)
    xtr, ytr = load_dataset(d.name, d.root, "train")
    xte, yte = load_dataset(d.name, d.root, "test")
    side = min(xtr.shape[-2:])
    if d.translate >= side:  # reflect padding needs a pad smaller than the image
        raise ValueError(f"config.data.translate must be less than the image side ({side} pixels for {d.name}), "
                         f"got {d.translate}")
    train = TensorLoader(xtr, ytr, d.batch_size, mean, std, shuffle=True, drop_last=False, flip=d.flip,
                         translate=d.translate, cutout=d.cutout, seed=seed, rank=rank, world_size=world, **common)
    test = TensorLoader(xte, yte, d.test_batch_size, mean, std, shuffle=False, **common)
    return train, test


def whole_split(loader):
    """The loader over the whole held-out split: a text loader that samples validation blocks gives its
    `full()` one, any other loader is itself."""
    return loader.full() if isinstance(loader, SequentialBlocks) else loader


def set_epoch(loader, epoch: int, skip_batches: int = 0) -> None:
    """Choose the epoch a train loader's next pass runs (its order and augmentation), without its first
    `skip_batches` batches (a run resumed from a checkpoint inside that epoch)."""
    if isinstance(loader, (TensorLoader, RandomBlocks)):
        loader.set_epoch(epoch, skip_batches)
    else:
        loader.sampler.set_epoch(epoch, skip=min(skip_batches * loader.batch_size, loader.sampler.num_samples))


def normalize_uint8(x: torch.Tensor, device, name: str = "imagefolder") -> torch.Tensor:
    """A uint8 image batch (as the image-folder loader yields it) in float, normalised by dataset `name`'s stats."""
    mean, std = STATS[name]
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s
