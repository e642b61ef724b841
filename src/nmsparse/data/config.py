"""The data section of a training config: which dataset, where, batch sizes and augmentation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | imagefolder
    root: str | None = None  # None: the default data directory (../shared/data when present)
    batch_size: int = 128
    test_batch_size: int = 1024
    flip: bool = False
    translate: int = 0
    cutout: int = 0
    workers: int = 4  # imagefolder only
    image_size: int = 224  # imagefolder only
