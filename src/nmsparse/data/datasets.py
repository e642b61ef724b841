"""Datasets as whole in-memory tensors (digits, MNIST, Fashion-MNIST, CIFAR-10) and an ImageNet-style folder.

Files are read in their standard distribution formats and checked: a missing file raises FileNotFoundError
saying where it was looked for and how to get it, a corrupt one ValueError saying what is wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .imagefolder import HOW_TO_IMAGEFOLDER, ImageFolder
from .loader import TensorLoader

__all__ = ["DATASETS", "STATS", "NUM_CLASSES", "SAMPLE_SHAPES", "sample_shape", "default_data_root", "load_dataset",
           "make_loader"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "tinyshakespeare", "text")
TEXT_DATASETS = ("tinyshakespeare", "text")  # character-level corpora (data/text.py): classes = the vocabulary
# Per-channel mean and std of the training images in [0, 1] units (imagefolder: ImageNet's).
STATS = {
    "digits": ((0.3050,), (0.3756,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10, "imagefolder": 1000}
# (channels, height, width) of one sample; imagefolder's side is its config's image_size.
SAMPLE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def sample_shape(name: str, image_size: int = 224) -> tuple[int, int, int]:
    """(C, H, W) of one sample of dataset `name` as the loaders deliver it."""
    return (3, image_size, image_size) if name == "imagefolder" else SAMPLE_SHAPES[name]

IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
MD5 = {
    ("mnist", "train-images-idx3-ubyte.gz"): "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ("mnist", "train-labels-idx1-ubyte.gz"): "d53e105ee54ea40749a09fcbcd1e9432",
    ("mnist", "t10k-images-idx3-ubyte.gz"): "9fb629c4189551a2d022fa330f9573f3",
    ("mnist", "t10k-labels-idx1-ubyte.gz"): "ec29112dd5afa0611ce80d1b7f02629c",
    ("fashion-mnist", "train-images-idx3-ubyte.gz"): "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ("fashion-mnist", "train-labels-idx1-ubyte.gz"): "25c81989df183df01b3e8a0aad5dffbe",
    ("fashion-mnist", "t10k-images-idx3-ubyte.gz"): "bef4ecab320f06d8554ea6380940ec79",
    ("fashion-mnist", "t10k-labels-idx1-ubyte.gz"): "bb300cfdad3c16e7a12a480ee83cd310",
    ("cifar10", "data_batch_1"): "c99cafc152244af753f735de768cd75f",
    ("cifar10", "data_batch_2"): "d4bba439e000b95fd0a9bffe97cbabec",
    ("cifar10", "data_batch_3"): "54ebc095f3ab1f0389bbae665268c751",
    ("cifar10", "data_batch_4"): "634d18415352ddfa80567beed471001a",
    ("cifar10", "data_batch_5"): "482c414d41f54cd18b22e5b47cb7c3cb",
    ("cifar10", "test_batch"): "40351d587109b95175f43aff81a1287e",
}
_IDX_NAMES = ", ".join(IDX_FILES["train"] + IDX_FILES["test"])
HOW_TO = {
    "mnist": f"MNIST is the four IDX files {_IDX_NAMES} in <root>/mnist/; the shared data folder "
             "../shared/data/mnist/ beside the checkout holds them (pass its parent as root, or set NMSPARSE_DATA)",
    "fashion-mnist": f"Fashion-MNIST is the four IDX files {_IDX_NAMES} in <root>/fashion-mnist/; the shared data "
                     "folder ../shared/data/fashion-mnist/ beside the checkout holds them (pass its parent as root, "
                     "or set NMSPARSE_DATA), or get them from https://github.com/zalandoresearch/fashion-mnist",
    "cifar10": "CIFAR-10 is cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a) from "
               "https://www.cs.toronto.edu/~kriz/cifar.html, extracted under <root> (tar xzf cifar-10-python.tar.gz "
               f"-C <root>) to give <root>/{CIFAR_DIR}/data_batch_1..5 and test_batch",
}


def _root_candidates() -> list[Path]:
    """Where the data folder is looked for when $NMSPARSE_DATA is not set: ../shared/data from the cwd, then
    beside the checkout."""
    repo = Path(__file__).resolve().parents[3]  # <repo>/src/nmsparse/data/datasets.py
    return [Path.cwd() / ".." / "shared" / "data", repo.parent / "shared" / "data"]


def default_data_root() -> Path:
    """The data folder: $NMSPARSE_DATA when set (an error when it is not a directory), else the first existing of
    ../shared/data from the cwd and <repo>/../shared/data."""
    env = os.environ.get("NMSPARSE_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"NMSPARSE_DATA={env} does not exist: set it to the folder that holds the "
                                    f"datasets (e.g. mnist/, fashion-mnist/), or unset it to use ../shared/data")
        if not path.is_dir():
            raise NotADirectoryError(f"NMSPARSE_DATA={env} is a file, not a directory: set it to the folder that "
                                     f"holds the datasets (e.g. mnist/, fashion-mnist/), or unset it to use "
                                     f"../shared/data")
        return path.resolve()
    candidates = _root_candidates()
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise FileNotFoundError("no data folder found: set NMSPARSE_DATA or pass root (looked in "
                            + ", ".join(str(c) for c in candidates) + ")")


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", verify: bool = False):
    """A whole split as (uint8 images N x C x H x W, int64 labels N); for "imagefolder" an ImageFolder dataset.

    verify=True also checks each file's MD5 against the standard distribution's.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if name in TEXT_DATASETS:
        raise ValueError(f"{name!r} is a text corpus, not an image dataset: read it with nmsparse.data.text_corpus")
    split = "test" if split == "val" else split
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return _load_digits(split)
    if root is None:
        try:
            root = default_data_root()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. {HOW_TO.get(name, HOW_TO_IMAGEFOLDER)}") from None
    root = Path(root)
    if name == "imagefolder":
        return ImageFolder(root, split)
    if name == "cifar10":
        batches = [_load_cifar_batch(_find(root, CIFAR_DIR, f, name, verify)) for f in CIFAR_FILES[split]]
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    image_file, label_file = (_find(root, name, f, name, verify) for f in IDX_FILES[split])
    images, labels = _parse_idx(image_file, 3), _parse_idx(label_file, 1)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels")
    if labels.numel() and labels.max() > 9:
        raise ValueError(f"{label_file}: label {int(labels.max())} is out of range 0..9")
    return images.unsqueeze(1), labels.long()


def make_loader(name: str, split: str = "train", batch_size: int = 128, root: str | Path | None = None,
                **kwargs) -> TensorLoader:
    """A TensorLoader over a whole in-memory dataset with its mean/std; shuffles the train split unless told."""
    images, labels = load_dataset(name, root, split)
    kwargs.setdefault("shuffle", split == "train")
    return TensorLoader(images, labels, batch_size, *STATS[name], **kwargs)


def _load_digits(split: str) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits, 0..16 scaled to 0..255, in a fixed seeded 80/20 split (as nmsparse.demo's)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.rint(d.images * (255 / 16))).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(images))
    idx = perm[:cut] if split == "train" else perm[cut:]
    return images[idx], labels[idx]


def _find(root: Path, sub: str, fname: str, name: str, verify: bool) -> Path:
    """root/sub/fname, or root/fname when root is the dataset's own folder; MD5-checked when asked."""
    for path in (root / sub / fname, root / fname):
        if path.is_file():
            if verify:
                _check_md5(path, MD5[name, fname])
            return path
    raise FileNotFoundError(f"{root / sub / fname} not found. {HOW_TO[name]}")


def _check_md5(path: Path, expected: str) -> None:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    if md5.hexdigest() != expected:
        raise ValueError(f"{path}: md5 {md5.hexdigest()} is not the standard {expected}; "
                         "the file is corrupt or not the standard distribution file")


def _parse_idx(path: Path, ndim: int) -> Tensor:
    """A gzip IDX file of unsigned bytes with `ndim` dimensions, its header checked against its length."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot decompress ({e}); the gzip file is truncated or corrupt") from e
    head = 4 + 4 * ndim
    kind = "an image" if ndim == 3 else "a label"
    if len(data) < head:
        raise ValueError(f"{path}: {len(data)} bytes, too short for the IDX header of {kind} file ({head} bytes)")
    magic, *dims = struct.unpack(f">{1 + ndim}I", data[:head])
    if magic != 0x800 + ndim:  # 0x08: unsigned bytes, then the number of dimensions
        raise ValueError(f"{path}: IDX magic number {magic}, expected {0x800 + ndim} for {kind} file")
    size = int(np.prod(dims))
    if len(data) - head != size:
        raise ValueError(f"{path}: the IDX header says {'x'.join(map(str, dims))} = {size} bytes of data but the "
                         f"file holds {len(data) - head}; it is truncated or corrupt")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=head).reshape(dims).copy())


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global could run code from the file."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):  # numpy 2 moved it; avoid the shim
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python batch: a pickled dict with b"data" (N x 3072 uint8 RGB planes) and b"labels"."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a damaged pickle can fail in many ways
        raise ValueError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                         "the file is truncated or corrupt") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f'{path}: expected a dict with keys b"data" and b"labels", got {keys}')
    data, labels = d[b"data"], np.asarray(d[b"labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f'{path}: b"data" is {desc}, expected a uint8 array of shape (N, 3072)')
    ok = labels.shape == (len(data),) and labels.dtype.kind in "iu"
    if not ok or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
        raise ValueError(f'{path}: b"labels" must be {len(data)} integers in 0..9, got {labels.dtype} {labels.shape}')
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))
