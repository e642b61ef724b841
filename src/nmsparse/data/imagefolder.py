"""An ImageNet-style folder (root/{train,val}/<class>/*.JPEG), decoded by PIL in DataLoader worker processes."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
HOW_TO_IMAGEFOLDER = ("imagefolder expects root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, one folder "
                      "per class (ImageNet's validation images must first be sorted into their class folders)")


def pil_to_tensor(img) -> torch.Tensor:
    """A PIL RGB image as a uint8 3 x H x W tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _uniform(lo: float, hi: float, generator: torch.Generator | None = None) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one training item's augmentation: a function of (seed, epoch, index) alone."""
    state = np.random.SeedSequence([seed, epoch, 2, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def random_resized_crop_box(w: int, h: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering `scale` of the area with aspect ratio in `ratio`."""
    for _ in range(10):
        area = w * h * _uniform(*scale, generator)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), generator))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            return left, top, left + cw, top + ch
    # Rarely no sample fits (very elongated images): take the centre at the nearest allowed aspect ratio.
    cw, ch = w, h
    if w / h < ratio[0]:
        ch = round(w / ratio[0])
    elif w / h > ratio[1]:
        cw = round(h * ratio[1])
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def center_crop_box(w: int, h: int, crop_fraction: float = 0.875) -> tuple[float, float, float, float]:
    """The centre square that resize-shorter-side-to-size/crop_fraction then center-crop-to-size keeps."""
    side = min(w, h) * crop_fraction
    left, top = (w - side) / 2, (h - side) / 2
    return left, top, left + side, top + side


class ImageFolder(Dataset):
    """Images from root/<split>/<class>/ with sorted class indices; items are (uint8 3 x S x S, label).

    Training items get a random resized crop and a random flip; evaluation items the centre crop (a 224
    crop of the image resized to 256 for the default fraction 0.875). One PIL resize does crop and scale.
    Normalisation is left to the device (data_loader.normalize), so workers send compact uint8 batches.
    An item asked for as (seed, epoch, index), as imagefolder_loader's sampler does, draws its crop and flip from
    item_generator(seed, epoch, index): the same in every worker process and after a resume.
    """

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 224, train: bool | None = None,
                 crop_fraction: float = 0.875, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        folder = Path(root) / ("train" if split == "train" else "val")
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: {HOW_TO_IMAGEFOLDER}")
        self.classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        self.samples = [(str(p), label) for label, c in enumerate(self.classes) for p in sorted((folder / c).iterdir())
                        if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}): {HOW_TO_IMAGEFOLDER}")
        self.train = split == "train" if train is None else train
        self.image_size, self.crop_fraction, self.scale, self.ratio = image_size, crop_fraction, scale, ratio

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        if isinstance(key, tuple):
            seed, epoch, i = key
            g = item_generator(seed, epoch, i) if self.train else None
        else:
            i, g = key, None
        path, label = self.samples[i]
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")
        except OSError as e:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
            raise ValueError(f"{path}: cannot decode the image ({e}); the file is corrupt or not an image") from e
        if self.train:
            box = random_resized_crop_box(*img.size, self.scale, self.ratio, g)
        else:
            box = center_crop_box(*img.size, self.crop_fraction)
        img = img.resize((self.image_size, self.image_size), Image.BILINEAR, box=box)
        if self.train and torch.rand((), generator=g) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img), label


class EpochSampler(DistributedSampler):
    """A DistributedSampler whose epoch can start part way through (a resumed run skips what it has trained on),
    and which asks an augmenting dataset for (seed, epoch, index), so an item's random crop and flip depend only
    on those: not on the worker process that loads it, nor on the epochs before."""

    def __init__(self, dataset, *, keyed: bool, **kwargs):
        super().__init__(dataset, **kwargs)
        self.keyed, self.skip = keyed, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch the next pass runs, leaving out its first `skip` samples (of this rank)."""
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip must be in [0, {self.num_samples}], got {skip}")
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        for i in itertools.islice(super().__iter__(), self.skip, None):
            yield (self.seed, self.epoch, i) if self.keyed else i

    def __len__(self) -> int:
        return self.num_samples - self.skip


def imagefolder_loader(dataset: ImageFolder, batch_size: int, *, workers: int = 4, shuffle: bool | None = None,
                       drop_last: bool | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                       pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader over worker processes; call loader.sampler.set_epoch(epoch) each epoch for a seeded order.

    The sampler is an EpochSampler, a DistributedSampler (world_size 1 included), which gives each rank a
    disjoint share and makes the order, and each training item's augmentation, a function of (seed, epoch), as
    TensorLoader does for in-memory data.
    """
    shuffle = dataset.train if shuffle is None else shuffle
    drop_last = dataset.train if drop_last is None else drop_last
    sampler = EpochSampler(dataset, keyed=dataset.train, num_replicas=world_size, rank=rank, shuffle=shuffle,
                           seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
