"""Wanda: exact patterns, equality with a plain float64 implementation, sequential calibration, its optimality
when the input features are orthogonal."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nmsparse.patterns import conv_to_2d, is_nm, is_transposable
from nmsparse.prune import magnitude_prune, wanda_prune

PATTERNS = [("2:4", 2, 4, False), ("1:4", 1, 4, False), ("4:8", 4, 8, False), ("2:4-T", 2, 4, True),
            ("4:8-T", 4, 8, True)]


def _mlp(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _check(w: torch.Tensor, n, m, transposable) -> None:
    if transposable:
        assert is_transposable(conv_to_2d(w) if w.dim() == 4 else w, n, m)
    else:
        assert is_nm(w, n, m, dim=1)


@settings(max_examples=15)
@given(pattern=st.sampled_from(PATTERNS), depth=st.integers(1, 3), width=st.integers(1, 3),
       rows=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_exact_pattern_on_random_mlps(pattern, depth, width, rows, seed):
    name, n, m, transposable = pattern
    widths = [8 * width] + [8 * (1 + (seed + i) % 3) for i in range(depth)] + [3]
    model = _mlp(widths, seed)
    x = torch.randn(rows, widths[0], generator=torch.Generator().manual_seed(seed))
    report = wanda_prune(model, x, name)
    assert report.names == [str(2 * i) for i in range(depth)]
    for i in range(depth):
        _check(model[2 * i].weight, n, m, transposable)
    assert model[2 * depth].weight.ne(0).all()  # the output layer stays dense


def _transposable_brute(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Largest kept score sum per m x m tile over every 0/1 tile with n per row and column, by enumeration."""
    rows = [c for c in itertools.combinations(range(m), n)]
    tiles = []
    for choice in itertools.product(rows, repeat=m):
        t = torch.zeros(m, m, dtype=torch.bool)
        for r, cols in enumerate(choice):
            t[r, list(cols)] = True
        if (t.sum(0) == n).all():
            tiles.append(t)
    mask = torch.zeros_like(score, dtype=torch.bool)
    for r0 in range(0, score.shape[0], m):
        for c0 in range(0, score.shape[1], m):
            s = score[r0:r0 + m, c0:c0 + m]
            best = max(tiles, key=lambda t: float(s[t].sum()))
            mask[r0:r0 + m, c0:c0 + m] = best
    return mask


def wanda_reference(w: torch.Tensor, x: torch.Tensor, n: int, m: int, transposable: bool = False) -> torch.Tensor:
    """Wanda written plainly in float64: feature norms over every calibration row, then per-row groups."""
    out_f, in_f = w.shape
    xs = x.double().reshape(-1, in_f)
    norms = [sum(float(xs[t, j]) ** 2 for t in range(len(xs))) ** 0.5 for j in range(in_f)]
    score = torch.tensor([[abs(float(w[i, j])) * norms[j] for j in range(in_f)] for i in range(out_f)],
                         dtype=torch.float64)
    if transposable:
        mask = _transposable_brute(score, n, m)
    else:
        mask = torch.zeros(out_f, in_f, dtype=torch.bool)
        for i in range(out_f):
            for g in range(0, in_f, m):
                order = sorted(range(g, g + m), key=lambda j: -float(score[i, j]))
                mask[i, order[:n]] = True
    return w.double() * mask


@pytest.mark.parametrize("pattern,n,m,transposable", [("2:4", 2, 4, False), ("4:8", 4, 8, False),
                                                        ("2:4-T", 2, 4, True)])
def test_equals_plain_float64_implementation(pattern, n, m, transposable):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    model = nn.Sequential(lin, nn.Linear(8, 2))
    x = torch.randn(5, 6, 16) * torch.linspace(0.1, 3, 16)  # leading dims flattened: 30 rows
    want = wanda_reference(lin.weight.detach(), x, n, m, transposable)
    report = wanda_prune(model, x, pattern, chunk=2)
    assert report.layers[0]["rows"] == 30
    torch.testing.assert_close(lin.weight.detach().double(), want)


def test_sequential_calibration():
    """The second layer's norms come from the first layer's *pruned* output."""
    model = _mlp([16, 16, 8, 2], 1)
    dense = copy.deepcopy(model)
    x = torch.randn(40, 16)
    wanda_prune(model, x, "2:4")
    w0 = wanda_reference(dense[0].weight.detach(), x, 2, 4)
    h = torch.relu(x.double() @ w0.T + dense[0].bias.detach().double())
    w2 = wanda_reference(dense[2].weight.detach(), h, 2, 4)
    torch.testing.assert_close(model[0].weight.double(), w0)
    torch.testing.assert_close(model[2].weight.double(), w2)


def test_chunks_do_not_change_the_result():
    a, b = _mlp([32, 32, 16, 4], 2), _mlp([32, 32, 16, 4], 2)
    x = torch.randn(50, 32)
    wanda_prune(a, x, "4:8", chunk=7)
    wanda_prune(b, x, "4:8", chunk=1000)
    for i in (0, 2):
        assert torch.equal(a[i].weight != 0, b[i].weight != 0)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_optimal_without_update_for_orthogonal_features(pattern):
    """With orthogonal input columns, ||X dW^T||^2 = sum of pruned S_ij^2: Wanda's mask is the best N:M mask
    that keeps the weights' values, so it can only beat magnitude's (here it does, the scales vary 30x)."""
    torch.manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(200, 32, dtype=torch.float64))
    x = (q * torch.logspace(-1, 0.5, 32, dtype=torch.float64)[torch.randperm(32)]).float()
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 2))
    w = model[0].weight.detach().clone()
    mag = magnitude_prune(copy.deepcopy(model), pattern)[0].weight.detach()
    wanda_prune(model, x, pattern)

    def err(wp):
        return float(((x.double() @ (w - wp).double().T) ** 2).sum())

    assert err(model[0].weight.detach()) < 0.9 * err(mag)


@pytest.mark.parametrize("pattern,n,m,transposable", [p for p in PATTERNS if p[0] in ("2:4", "4:8-T")])
def test_convs(pattern, n, m, transposable):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 9, 3))
    wanda_prune(model, torch.randn(6, 3, 6, 6), pattern)
    for i in (2, 4):
        _check(model[i].weight, n, m, transposable)


def test_conv_norms_per_group_and_position():
    """A 1x1 conv is a Linear over channels at every position; a grouped one, one Linear per group."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1, groups=2)
    x = torch.randn(3, 16, 4, 5)
    ref = []
    for g in range(2):
        xg = x[:, 8 * g:8 * g + 8].permute(0, 2, 3, 1).reshape(-1, 8)
        ref.append(wanda_reference(conv.weight.detach()[4 * g:4 * g + 4, :, 0, 0], xg, 2, 4))
    wanda_prune(nn.Sequential(conv, nn.Flatten(), nn.Linear(160, 2)), x, "2:4")
    torch.testing.assert_close(conv.weight.detach()[:, :, 0, 0].double(), torch.cat(ref))
