"""`nmsparse demo`: every pattern on a real trained weight (an MLP on scikit-learn's digits)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .common.text import markdown_table
from .formats import compress_block, compress_nm
from .kernels.transposable import transposable_mask
from .patterns import block_mask, is_transposable, mask_diversity, nm_mask


def load_digits_tensors(seed: int = 0):
    """The 1797 8x8 digits as (train, test) float tensors scaled to [0, 1], a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def train_mlp(train, seed: int = 0, hidden: int = 128, steps: int = 300):
    """A 64-hidden-10 MLP trained full-batch with Adam: seconds on a CPU."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = train
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


@torch.no_grad()
def accuracy(net, data, weight=None) -> float:
    x, y = data
    w0 = net[0].weight.clone()
    if weight is not None:
        net[0].weight.copy_(weight)
    acc = (net(x).argmax(1) == y).float().mean().item()
    net[0].weight.copy_(w0)
    return 100 * acc


def ascii_mask(mask: torch.Tensor, rows: int = 8, cols: int = 16) -> str:
    return "\n".join("".join("#" if v else "." for v in r) for r in mask[:rows, :cols].tolist())


def main(seed: int = 0) -> None:
    t0 = time.perf_counter()
    train, test = load_digits_tensors(seed)
    net = train_mlp(train, seed)
    w = net[0].weight.detach()  # (128, 64): the real weight every pattern is computed for
    print(f"Trained a 64-128-10 MLP on scikit-learn digits in {time.perf_counter() - t0:.1f} s; "
          f"first-layer weight {tuple(w.shape)}, test accuracy {accuracy(net, test):.1f}%.\n")
    total = float(w.abs().sum())
    unstructured = w.abs() >= w.abs().flatten().kthvalue(w.numel() // 2 + 1).values
    cases = [
        ("unstructured 50%", unstructured, mask_diversity("unstructured", density=0.5), None),
        ("2:4", nm_mask(w, 2, 4), mask_diversity("2:4"), compress_nm(w * nm_mask(w, 2, 4), 2, 4)),
        ("4:8", nm_mask(w, 4, 8), mask_diversity("4:8"), compress_nm(w * nm_mask(w, 4, 8), 4, 8)),
        ("2:4-T exact", transposable_mask(w, 2, 4), mask_diversity("2:4-T"), None),
        ("4:8-T exact", transposable_mask(w, 4, 8), mask_diversity("4:8-T"), None),
        ("4:8-T greedy", transposable_mask(w, 4, 8, "greedy"), mask_diversity("4:8-T"), None),
        ("block 8x8 50%", block_mask(w, (8, 8), 0.5), mask_diversity("block", density=0.5, block=64), None),
    ]
    rows = []
    for name, mask, md, packed in cases:
        if packed is None and name.startswith(("2:4-T", "4:8-T")):
            n, m = (2, 4) if name.startswith("2:4") else (4, 8)
            assert is_transposable(mask, n, m, exact="exact" in name)
            packed = compress_nm(w * mask, n, m, mask=mask) if "exact" in name else None
        if name.startswith("block"):
            packed = compress_block(w * mask)
        size = f"{packed.nbytes / packed.dense_nbytes:.3f}" if packed is not None else "-"
        rows.append([name, f"{mask.float().mean():.3f}", f"{float((w.abs() * mask).sum()) / total:.3f}",
                     f"{md:.3f}", size, f"{accuracy(net, test, w * mask):.1f}"])
    print(markdown_table(["pattern", "density", "kept |w| share", "mask diversity / elem",
                          "stored bytes / dense", "test acc % (one-shot, no retraining)"], rows))
    print("\n4:8-T exact mask, first 8x16 entries (# kept): every 8x8 tile keeps 4 per row and column")
    print(ascii_mask(transposable_mask(w, 4, 8)))
    print(f"\nDone in {time.perf_counter() - t0:.1f} s.")
