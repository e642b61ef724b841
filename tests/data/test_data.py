"""Data loading: real MNIST/Fashion-MNIST, format readers on files written here, device-side batching."""

import gzip
import os
import re
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from nmsparse.data import (STATS, ImageFolder, TensorLoader, cutout_images, default_data_root, flip_images,
                           imagefolder_loader, load_dataset, make_loader, normalize, set_epoch, shard_indices,
                           translate_images)

IDX_NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def write_idx(path: Path, arr, magic: int | None = None, cut: int = 0) -> None:
    """An IDX file of unsigned bytes, gzip-compressed; `cut` drops that many data bytes from the end."""
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(f">{1 + arr.ndim}I", 0x800 + arr.ndim if magic is None else magic, *arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes()[:arr.size - cut])


def write_mnist(folder: Path, n_train=7, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for split, (img, lab), n in [("train", IDX_NAMES[:2], n_train), ("test", IDX_NAMES[2:], n_test)]:
        x, y = rng.integers(0, 256, (n, 5, 6)), rng.integers(0, 10, n)
        write_idx(folder / img, x)
        write_idx(folder / lab, y)
        data[split] = x, y
    return data


# ---- digits --------------------------------------------------------------------------------------------------

def test_digits_shapes_split_and_determinism():
    from sklearn.datasets import load_digits

    xtr, ytr = load_dataset("digits", split="train")
    xte, yte = load_dataset("digits", split="test")
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    assert int(xtr.max()) == 255 and set(ytr.tolist()) == set(range(10))
    x2, y2 = load_dataset("digits", split="train")
    assert torch.equal(x2, xtr) and torch.equal(y2, ytr)
    # The two splits partition the 1797 digits.
    full = torch.from_numpy(np.rint(load_digits().images * 255 / 16)).to(torch.uint8)
    key = lambda x: sorted(map(bytes, x.reshape(len(x), -1).numpy()))  # noqa: E731
    assert key(torch.cat([xtr, xte])) == key(full)


def test_bad_name_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="dev")


# ---- real MNIST and Fashion-MNIST --------------------------------------------------------------------------

def shared_root() -> Path:
    try:
        return default_data_root()
    except FileNotFoundError:
        pytest.skip("no shared data folder")


MNIST_COUNTS = {
    ("mnist", "train"): [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    ("mnist", "test"): [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    ("fashion-mnist", "train"): [6000] * 10,
    ("fashion-mnist", "test"): [1000] * 10,
}


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_mnist_files(name):
    root = shared_root()
    if not (root / name / IDX_NAMES[0]).is_file():
        pytest.skip(f"{name} not in {root}")
    for split, n in [("train", 60000), ("test", 10000)]:
        x, y = load_dataset(name, root, split, verify=True)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8 and y.shape == (n,) and y.dtype == torch.int64
        assert torch.bincount(y, minlength=10).tolist() == MNIST_COUNTS[name, split]
        if split == "train":
            xf = x.float() / 255
            assert abs(xf.mean() - STATS[name][0][0]) < 1e-3 and abs(xf.std() - STATS[name][1][0]) < 1e-3


def test_default_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NMSPARSE_DATA", str(tmp_path))
    assert default_data_root() == tmp_path.resolve()
    monkeypatch.delenv("NMSPARSE_DATA")
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here: falls back to the one beside the checkout
    beside = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if beside.is_dir():
        assert default_data_root() == beside.resolve()
    else:
        with pytest.raises(FileNotFoundError, match="NMSPARSE_DATA"):
            default_data_root()


def test_a_set_nmsparse_data_that_is_not_a_directory_is_an_error(tmp_path, monkeypatch, capsys):
    # Set but wrong: an error naming the variable and its value, never a silent fall back to ../shared/data.
    absent = tmp_path / "absent"
    monkeypatch.setenv("NMSPARSE_DATA", str(absent))
    with pytest.raises(FileNotFoundError, match=rf"NMSPARSE_DATA={re.escape(str(absent))} does not exist.*unset"):
        default_data_root()
    with pytest.raises(FileNotFoundError, match=rf"NMSPARSE_DATA={re.escape(str(absent))} does not exist"):
        load_dataset("mnist")
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setenv("NMSPARSE_DATA", str(a_file))
    with pytest.raises(NotADirectoryError, match=rf"NMSPARSE_DATA={re.escape(str(a_file))} is a file, not a directory"):
        default_data_root()
    from nmsparse.cli import main as cli
    assert cli(["train", "--set", "data.name=mnist", "--set", "epochs=1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"NMSPARSE_DATA={a_file} is a file" in err
    monkeypatch.setenv("NMSPARSE_DATA", "")  # set but empty counts as unset
    try:
        default_data_root()
    except FileNotFoundError as e:
        assert "NMSPARSE_DATA=" not in str(e)


# ---- IDX files written here --------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["mnist", ""])
def test_idx_round_trip(tmp_path, sub):
    data = write_mnist(tmp_path / sub)  # in root/mnist/, or in root itself
    for split in ("train", "test"):
        x, y = load_dataset("mnist", tmp_path, split)
        assert torch.equal(x[:, 0], torch.tensor(data[split][0], dtype=torch.uint8))
        assert torch.equal(y, torch.tensor(data[split][1]))


def test_idx_truncated_bad_magic_and_mismatch(tmp_path):
    folder = tmp_path / "fashion-mnist"
    write_mnist(folder)
    images = folder / IDX_NAMES[0]
    x = np.zeros((7, 5, 6))
    write_idx(images, x, cut=10)
    with pytest.raises(ValueError, match="truncated") as e:
        load_dataset("fashion-mnist", tmp_path)
    assert str(images) in str(e.value) and "7x5x6 = 210" in str(e.value)

    write_idx(images, x, magic=2049)
    with pytest.raises(ValueError, match="magic number 2049, expected 2051") as e:
        load_dataset("fashion-mnist", tmp_path)
    assert str(images) in str(e.value)

    write_idx(images, x)
    raw = images.read_bytes()
    images.write_bytes(raw[: len(raw) // 2])  # a cut gzip stream
    with pytest.raises(ValueError, match="gzip") as e:
        load_dataset("fashion-mnist", tmp_path)
    assert str(images) in str(e.value)

    write_idx(images, np.zeros((6, 5, 6)))
    with pytest.raises(ValueError, match="6 images but .* 7 labels"):
        load_dataset("fashion-mnist", tmp_path)

    write_idx(images, x)
    write_idx(folder / IDX_NAMES[1], np.full(7, 10))
    with pytest.raises(ValueError, match="label 10 is out of range") as e:
        load_dataset("fashion-mnist", tmp_path)
    assert str(folder / IDX_NAMES[1]) in str(e.value)


def test_missing_files_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "mnist" / IDX_NAMES[0]) in msg and "../shared/data" in msg
    assert all(n in msg for n in IDX_NAMES)

    write_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / IDX_NAMES[3]).unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "mnist" / IDX_NAMES[3])):
        load_dataset("mnist", tmp_path, "test")

    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(e.value)
    assert "cifar-10-python.tar.gz" in str(e.value)

    with pytest.raises(FileNotFoundError, match="root/val/<class>"):
        load_dataset("imagefolder", tmp_path, "test")

    # No data folder at all: the message says where it looked and what the files are.
    monkeypatch.delenv("NMSPARSE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    import nmsparse.data.datasets as data
    monkeypatch.setattr(data, "_root_candidates", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="nowhere.*train-images-idx3-ubyte.gz"):
        load_dataset("mnist")


def test_md5_verify(tmp_path):
    write_mnist(tmp_path / "mnist")
    load_dataset("mnist", tmp_path)  # no check without verify
    with pytest.raises(ValueError, match="md5 .* is not the standard f68b3c2dcbeaaa9fbdd348bbdeb94873") as e:
        load_dataset("mnist", tmp_path, verify=True)
    assert str(tmp_path / "mnist" / IDX_NAMES[0]) in str(e.value)


# ---- CIFAR-10 python batches written here ------------------------------------------------------------------

def write_cifar_batch(path: Path, n: int, rng) -> tuple[np.ndarray, list[int]]:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batch = {b"batch_label": b"batch", b"labels": labels, b"data": data,
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return data, labels


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    train = [write_cifar_batch(folder / f"data_batch_{i}", 4, rng) for i in range(1, 6)]
    test = write_cifar_batch(folder / "test_batch", 3, rng)
    x, y = load_dataset("cifar10", tmp_path, "train")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == sum((labels for _, labels in train), [])
    data = np.concatenate([d for d, _ in train])
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each plane 32x32 row-major.
    assert x[5, 1, 2, 3] == data[5, 1024 + 2 * 32 + 3] and x[19, 2, 31, 0] == data[19, 2048 + 31 * 32]
    assert torch.equal(x.reshape(20, -1), torch.from_numpy(data))
    xt, yt = load_dataset("cifar10", tmp_path, "test")
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == test[1]


def test_cifar10_corrupt_batches(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_cifar_batch(path, 3, rng)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        load_dataset("cifar10", tmp_path, "test")
    assert str(path) in str(e.value)

    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"uint8 \(3, 1024\), expected a uint8 array of shape \(N, 3072\)"):
        load_dataset("cifar10", tmp_path, "test")

    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match="must be 3 integers in 0..9"):
        load_dataset("cifar10", tmp_path, "test")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(path, "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="is not allowed"):
        load_dataset("cifar10", tmp_path, "test")
    assert not (tmp_path / "pwned").exists()


# ---- imagefolder ---------------------------------------------------------------------------------------------

@pytest.fixture
def image_root(tmp_path):
    Image = pytest.importorskip("PIL.Image")

    rng = np.random.default_rng(0)
    for split, per_class in [("train", 3), ("val", 2)]:
        for c in ["zebra", "ant", "mole"]:  # classes index in sorted order: ant 0, mole 1, zebra 2
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = (20, 14) if i % 2 else (12, 30)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.JPEG")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagefolder_items(image_root):
    train = load_dataset("imagefolder", image_root, "train")
    assert isinstance(train, ImageFolder) and train.classes == ["ant", "mole", "zebra"]
    assert train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(Path(p).parent.name == train.classes[label] for p, label in train.samples)
    train = ImageFolder(image_root, "train", image_size=8)
    for i in range(len(train)):
        x, label = train[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and label == train.targets[i]
    val = ImageFolder(image_root, "val", image_size=6)
    assert not val.train and len(val) == 6 and val[5][0].shape == (3, 6, 6) and val[5][1] == 2


def test_imagefolder_center_crop_is_exact_on_lossless_image(tmp_path):
    Image = pytest.importorskip("PIL.Image")

    arr = np.random.default_rng(1).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    (tmp_path / "val" / "a").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "val" / "a" / "x.png")
    # crop_fraction 0.5 of the shorter side 16 is an 8x8 centre square, resized to 8x8: a plain copy.
    x, _ = ImageFolder(tmp_path, "val", image_size=8, crop_fraction=0.5)[0]
    assert torch.equal(x, torch.from_numpy(arr[4:12, 6:14]).permute(2, 0, 1))


def test_imagefolder_corrupt_image(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    bad = tmp_path / "train" / "a" / "bad.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="cannot decode") as e:
        ImageFolder(tmp_path)[0]
    assert str(bad) in str(e.value)


def test_imagefolder_through_worker_processes(image_root):
    ds = ImageFolder(image_root, "train", image_size=8)
    loader = imagefolder_loader(ds, batch_size=4, workers=2, drop_last=False, seed=3)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [4, 4, 1]
        assert all(x.shape[1:] == (3, 8, 8) and x.dtype == torch.uint8 for x, _ in batches)
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(ds.targets)
    # Two ranks each get a disjoint half (padded by wrapping to 5 + 5).
    shards = [list(imagefolder_loader(ds, 5, workers=0, shuffle=False, drop_last=False, rank=r, world_size=2).sampler)
              for r in range(2)]
    assert [[i for _, _, i in s] for s in shards] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 0]]


def test_imagefolder_epoch_depends_only_on_seed_and_epoch(image_root):
    # Order and augmentation: the same with or without worker processes, and a resumed epoch is the tail of a
    # whole one (the crop and flip of an item do not depend on what was loaded before it).
    ds = ImageFolder(image_root, "train", image_size=8)

    def batches(epoch, workers=0, skip=0):
        loader = imagefolder_loader(ds, batch_size=2, workers=workers, drop_last=False, seed=3)
        set_epoch(loader, epoch, skip)
        return [torch.cat([x.flatten(), y]) for x, y in loader]

    whole, workers, tail = batches(1), batches(1, workers=2), batches(1, skip=2)
    assert len(whole) == len(workers) == 5 and len(tail) == 3
    assert all(torch.equal(a, b) for a, b in zip(whole, workers))
    assert all(torch.equal(a, b) for a, b in zip(whole[2:], tail))
    assert not all(torch.equal(a, b) for a, b in zip(whole, batches(2)))


# ---- augmentation ---------------------------------------------------------------------------------------------

def test_normalize():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = STATS["cifar10"]
    expect = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normalize(x, mean, std), expect)


def test_flip_flips_exactly_the_chosen(device):
    x = torch.randn(9, 2, 5, 7, device=device)
    which = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool, device=device)
    out = flip_images(x, which)
    for i in range(len(x)):
        assert torch.equal(out[i], torch.flip(x[i], [-1]) if which[i] else x[i])


@pytest.mark.parametrize("mode", ["reflect", "constant", "replicate"])
@pytest.mark.parametrize("pad", [1, 2, 3])
def test_translate_matches_per_image_slicing(device, mode, pad):
    g = torch.Generator().manual_seed(pad)
    x = torch.randn(16, 3, 6, 7, generator=g).to(device)
    shifts = torch.randint(-pad, pad + 1, (16, 2), generator=g)
    shifts[:4] = torch.tensor([[-pad, -pad], [pad, pad], [-pad, pad], [0, 0]])
    out = translate_images(x, shifts.to(device), pad, mode)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        xp = F.pad(x[i:i + 1], (pad,) * 4, mode=mode)[0]
        ref = xp[:, pad - dy:pad - dy + 6, pad - dx:pad - dx + 7]
        assert torch.equal(out[i], ref), (i, dy, dx)
    # A shift moves content: with (dy, dx) = (1, pad) the pixel at (0, 0) lands at (1, pad).
    one = translate_images(x[:1], torch.tensor([[1, pad]], device=device), pad, mode)
    assert torch.equal(one[0, :, 1:, pad:], x[0, :, :-1, :-pad])


@pytest.mark.parametrize("size", [1, 3, 4])
def test_cutout_zeros_clipped_squares(device, size):
    g = torch.Generator().manual_seed(size)
    x = torch.rand(20, 2, 6, 5, generator=g).to(device) + 1  # no zeros before cutout
    corners = torch.stack([torch.randint(-size, 7, (20,), generator=g), torch.randint(-size, 6, (20,), generator=g)], 1)
    out = cutout_images(x, corners.to(device), size)
    for i, (top, left) in enumerate(corners.tolist()):
        ref = x[i].clone()
        ref[:, max(top, 0):max(top + size, 0), max(left, 0):max(left + size, 0)] = 0
        assert torch.equal(out[i], ref), (i, top, left)
        rows = min(top + size, 6) - max(top, 0)
        cols = min(left + size, 5) - max(left, 0)
        assert int((out[i] == 0).sum()) == 2 * max(rows, 0) * max(cols, 0)


# ---- TensorLoader -------------------------------------------------------------------------------------------

def id_loader(n=50, batch_size=8, **kw):
    """Images whose every pixel is the sample's id, and labels equal to the id: batches reveal their indices."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return TensorLoader(images, torch.arange(n), batch_size, mean=(0.0,), std=(1 / 255,), **kw)


def epoch_ids(loader, epoch, skip=0):
    loader.set_epoch(epoch, skip)
    return [y.tolist() for _, y in loader]


def test_loader_batches_and_normalisation(device):
    loader = id_loader(device=device, shuffle=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 7 and [len(y) for _, y in batches] == [8] * 6 + [2]
    for x, y in batches:
        assert x.device.type == device and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.allclose(x, y.float().view(-1, 1, 1, 1).expand(-1, 1, 4, 4).to(device))  # (id/255 - 0) * 255
    assert [len(y) for _, y in id_loader(drop_last=True)] == [8] * 6
    half = id_loader(device=device, dtype=torch.bfloat16, channels_last=True)
    x, _ = next(iter(half))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_shuffle_reproducible_per_seed_and_epoch():
    a, b = id_loader(seed=1), id_loader(seed=1)
    e0, e1 = epoch_ids(a, 0), epoch_ids(a, 1)
    assert e0 == epoch_ids(b, 0) and e1 == epoch_ids(b, 1) and e0 != e1
    assert e0 != epoch_ids(id_loader(seed=2), 0)
    assert sorted(sum(e0, [])) == list(range(50))
    assert epoch_ids(a, 0) == e0  # the same epoch again: the same order


def test_skip_batches_equals_tail_of_epoch():
    loader = id_loader(seed=4, flip=True, translate=1, cutout=2)
    loader.set_epoch(3)
    full = list(loader)
    loader.set_epoch(3, skip_batches=4)
    tail = list(loader)
    assert len(tail) == len(full) - 4
    for (x, y), (xf, yf) in zip(tail, full[4:]):
        assert torch.equal(x, xf) and torch.equal(y, yf)
    assert len(list(loader)) == len(full)  # the skip applies to one pass only
    with pytest.raises(ValueError):
        loader.set_epoch(0, skip_batches=8)


def test_loader_augmentation_is_per_image_and_seeded(device):
    n = 64
    images = torch.randint(1, 256, (n, 1, 6, 6), dtype=torch.uint8)
    kw = dict(mean=(0.0,), std=(1.0,), device=device, shuffle=False)
    plain = next(iter(TensorLoader(images, torch.arange(n), n, **kw)))[0]
    flipped = next(iter(TensorLoader(images, torch.arange(n), n, flip=True, **kw)))[0]
    is_flip = [torch.equal(flipped[i], plain[i].flip(-1)) for i in range(n)]
    assert all(is_flip[i] or torch.equal(flipped[i], plain[i]) for i in range(n)) and 10 < sum(is_flip) < 54
    cut = next(iter(TensorLoader(images, torch.arange(n), n, cutout=3, **kw)))[0]
    zeros = (cut == 0).flatten(1).sum(1)
    assert (zeros > 0).all() and (zeros <= 9).all() and (zeros == 9).sum() > 10
    moved = next(iter(TensorLoader(images, torch.arange(n), n, translate=2, pad_mode="constant", **kw)))[0]
    assert sum(not torch.equal(moved[i], plain[i]) for i in range(n)) > n // 2


def test_make_loader_digits():
    loader = make_loader("digits", "train", batch_size=256, translate=1)
    x = torch.cat([x for x, _ in loader])
    assert x.shape == (1437, 1, 8, 8) and abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1
    assert not make_loader("digits", "test").shuffle


# ---- distributed sharding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 10, 12, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_indices_like_distributed_sampler(n, world, drop_last):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [shard_indices(order, r, world, drop_last) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    got = torch.cat(shards)
    if drop_last:
        assert len(got) == n // world * world and len(set(got.tolist())) == len(got)  # disjoint
    else:
        assert set(got.tolist()) == set(range(n)) and len(got) == -(-n // world) * world
        if n % world == 0:
            assert sorted(got.tolist()) == list(range(n))
    for r in range(world):  # the same split as torch's sampler on the identity order
        ours = shard_indices(torch.arange(n), r, world, drop_last).tolist()
        assert ours == list(DistributedSampler(range(n), world, r, shuffle=False, drop_last=drop_last))


def test_loader_ranks_partition_each_epoch():
    world = 3
    loaders = [id_loader(n=48, batch_size=4, seed=7, rank=r, world_size=world) for r in range(world)]
    for epoch in range(2):
        ids = [sum(epoch_ids(ld, epoch), []) for ld in loaders]
        assert all(len(i) == 16 for i in ids)
        assert sorted(sum(ids, [])) == list(range(48))
    with pytest.raises(ValueError, match="rank"):
        id_loader(rank=2, world_size=2)
