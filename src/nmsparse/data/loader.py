"""Batches from whole-dataset tensors held on the training device, augmented a batch at a time (airbench style)."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """0..255 images (uint8 or float) to float (x/255 - mean)/std per channel, mean and std in [0, 1] units."""
    mean_t = torch.as_tensor(mean, device=x.device, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, device=x.device, dtype=torch.float32).view(-1, 1, 1)
    return (x.float() / 255 - mean_t) / std_t


def flip_images(x: Tensor, which: Tensor) -> Tensor:
    """Mirror left-right the images of the batch where `which` (bool, N) is True."""
    return torch.where(which.view(-1, 1, 1, 1), x.flip(-1), x)


def translate_images(x: Tensor, shifts: Tensor, pad: int, mode: str = "reflect") -> Tensor:
    """Move image i by shifts[i] = (dy, dx), each in [-pad, pad]: pad the batch, then crop each image at its offset."""
    n, c, h, w = x.shape
    if pad == 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    # out[i, :, r, q] = xp[i, :, pad - dy + r, pad - dx + q]: two gathers keep the NCHW layout.
    rows = (pad - shifts[:, 0]).view(n, 1, 1, 1) + torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = (pad - shifts[:, 1]).view(n, 1, 1, 1) + torch.arange(w, device=x.device).view(1, 1, 1, w)
    xp = xp.gather(2, rows.expand(n, c, h, w + 2 * pad))
    return xp.gather(3, cols.expand(n, c, h, w))


def cutout_images(x: Tensor, corners: Tensor, size: int) -> Tensor:
    """Zero a size x size square per image with top-left corner corners[i] = (top, left), clipped at the borders."""
    n, _, h, w = x.shape
    top, left = corners[:, :1], corners[:, 1:]
    r = torch.arange(h, device=x.device)
    q = torch.arange(w, device=x.device)
    in_rows = (r >= top) & (r < top + size)
    in_cols = (q >= left) & (q < left + size)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)


def shard_indices(order: Tensor, rank: int, world_size: int, drop_last: bool = False) -> Tensor:
    """Rank's disjoint share of an epoch's order: trimmed, or padded by wrapping, to a multiple of world_size.

    The same rule as torch's DistributedSampler, so every rank runs the same number of steps.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    n = len(order)
    if drop_last:
        order = order[: n - n % world_size]
    elif n % world_size:
        total = -(-n // world_size) * world_size
        order = order.repeat(-(-total // n))[:total]
    return order[rank::world_size]


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one (seed, epoch, stream): draws do not depend on the device or on earlier epochs."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


class TensorLoader:
    """Shuffled, augmented, normalised batches from uint8 images held in memory on the training device.

    The order and the augmentation of an epoch depend only on (seed, epoch), so a resumed run that calls
    set_epoch(epoch, skip_batches=k) sees exactly the batches the interrupted run would have seen.
    Flip is off by default: it changes the meaning of digits. Cutout zeros normalised values (the mean colour).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], *, device: str | torch.device | None = None, shuffle: bool = True,
                 drop_last: bool = False, flip: bool = False, translate: int = 0, cutout: int = 0,
                 pad_mode: str = "reflect", seed: int = 0, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"need images N x C x H x W and N labels, got {tuple(images.shape)} and {len(labels)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean and std need {images.shape[1]} channels, got {len(mean)} and {len(std)}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)  # uint8 stays uint8: 4x less memory, converted per batch
        self.labels = labels.to(self.device, torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.flip, self.translate, self.cutout, self.pad_mode = flip, translate, cutout, pad_mode
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.dtype, self.channels_last = dtype, channels_last
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch the next pass runs; skip its first batches (once) when resuming mid-epoch."""
        if not 0 <= skip_batches <= len(self):
            raise ValueError(f"skip_batches must be in [0, {len(self)}], got {skip_batches}")
        self.epoch, self._skip = epoch, skip_batches

    def __len__(self) -> int:
        n, ws = len(self.images), self.world_size
        n = n // ws if self.drop_last else -(-n // ws)  # samples per rank, as shard_indices gives
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_indices(self, epoch: int) -> Tensor:
        """This rank's sample order for `epoch` (CPU tensor), before batching."""
        n = len(self.images)
        order = torch.randperm(n, generator=_epoch_generator(self.seed, epoch, 0)) if self.shuffle else torch.arange(n)
        return shard_indices(order, self.rank, self.world_size, self.drop_last)

    def _augment_params(self, epoch: int) -> dict[str, Tensor]:
        """Per-sample flip, shift and cutout corner for the whole epoch, indexed by sample id."""
        g = _epoch_generator(self.seed, epoch, 1)
        n, _, h, w = self.images.shape
        p = {}
        if self.flip:
            p["flip"] = torch.rand(n, generator=g) < 0.5
        if self.translate:
            p["shift"] = torch.randint(-self.translate, self.translate + 1, (n, 2), generator=g)
        if self.cutout:
            centres = torch.stack([torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)], 1)
            p["corner"] = centres - self.cutout // 2
        return {k: v.to(self.device) for k, v in p.items()}

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, skip = self.epoch, self._skip
        self._skip = 0
        order = self.epoch_indices(epoch).to(self.device)
        params = self._augment_params(epoch)
        for b in range(skip, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self._batch(idx, {k: v[idx] for k, v in params.items()})

    def _batch(self, idx: Tensor, p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x = self.images[idx].float()
        if "flip" in p:
            x = flip_images(x, p["flip"])
        if "shift" in p:
            x = translate_images(x, p["shift"], self.translate, self.pad_mode)
        x = normalize(x, self.mean, self.std)
        if "corner" in p:
            x = cutout_images(x, p["corner"], self.cutout)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(self.dtype, memory_format=fmt), self.labels[idx]
