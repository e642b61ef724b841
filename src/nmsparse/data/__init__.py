"""Every dataset reader: digits (embedded), MNIST and Fashion-MNIST idx files, CIFAR-10 batches, image folders,
and character-level text corpora (Tiny Shakespeare or any UTF-8 file).

``load_dataset`` reads a whole split, ``TensorLoader`` batches in-memory tensors with seeded
augmentation (identical across resumes and DDP ranks), ``build_loaders`` makes both loaders of a
``DataConfig``; ``STATS``, ``NUM_CLASSES`` and ``sample_shape`` describe each dataset.
"""

from .build import build_loaders, normalize_uint8, num_classes, set_epoch, text_corpus, whole_split
from .config import DataConfig
from .datasets import (DATASETS, NUM_CLASSES, TEXT_DATASETS, SAMPLE_SHAPES, STATS, default_data_root, load_dataset, make_loader,
                       sample_shape)
from .imagefolder import ImageFolder, imagefolder_loader
from .text import CharCorpus, RandomBlocks, SequentialBlocks, calibration_blocks, read_corpus
from .loader import TensorLoader, cutout_images, flip_images, normalize, shard_indices, translate_images

__all__ = ["DATASETS", "NUM_CLASSES", "TEXT_DATASETS", "CharCorpus", "RandomBlocks", "SequentialBlocks",
           "calibration_blocks", "read_corpus", "num_classes", "text_corpus", "whole_split", "SAMPLE_SHAPES", "STATS", "DataConfig", "ImageFolder", "TensorLoader",
           "build_loaders", "cutout_images", "default_data_root", "flip_images", "imagefolder_loader",
           "load_dataset", "make_loader", "normalize", "normalize_uint8", "sample_shape", "set_epoch", "shard_indices",
           "translate_images"]
