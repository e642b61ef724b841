"""The data section of a training config: which dataset, where, batch sizes and augmentation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | imagefolder | tinyshakespeare | text
    root: str | None = None  # None: the default data directory (../shared/data when present)
    path: str | None = None  # text only: the UTF-8 file of data.name "text"
    batch_size: int = 128
    test_batch_size: int = 1024
    flip: bool = False
    translate: int = 0
    cutout: int = 0
    workers: int = 4  # imagefolder only
    image_size: int = 224  # imagefolder only
    block_size: int = 64  # text only: characters per sequence
    steps_per_epoch: int = 0  # text only: random-block batches between evaluations (an "epoch"); must be set
    val_fraction: float = 0.1  # text only: the last fraction of the file is the validation split
    val_blocks: int = 0  # text only: blocks evaluated during training, evenly spaced (0: all); the last eval: all
