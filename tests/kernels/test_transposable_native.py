"""The compiled exact transposable solver (kernels/transposable.py, csrc/transposable.cpp).

Optimality against the PyTorch exact solver, OR-tools' min-cost flow and the LP; ties, zeros and
non-finite values; hypothesis tiles; the dispatch and its NMSPARSE_NO_NATIVE fallback; the same
mask for any thread count.
"""

import os
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given

import nmsparse
from nmsparse.kernels import transposable as kt
from nmsparse.patterns import conv_to_2d, is_transposable
from nmsparse.patterns import transposable_mask as torch_mask
from nmsparse.patterns.transposable import to_tiles

# Against the PyTorch solver (fast enough up to m = 16); m = 32 and 64 are checked against OR-tools.
NM = [(4, 8), (2, 8), (1, 8), (7, 8), (8, 16), (3, 16), (1, 4), (2, 4), (3, 4), (5, 12)]


@pytest.fixture(scope="module", autouse=True)
def native():
    if not kt.native_available():
        pytest.skip(f"the compiled transposable solver is unavailable: {kt.native_error()}")


@pytest.fixture(autouse=True)
def one_thread():
    """The references' many small ops run faster on one thread; the thread test sets its own."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tile_sums(w, mask, m):
    """Kept sum of |w| per tile, in float64."""
    return (to_tiles(w.detach().abs().double(), m) * to_tiles(mask, m)).sum((1, 2))


def assert_optimal_like(w, got, ref, n, m, rtol=1e-12):
    """got is transposable with n per row/column of every tile and keeps what the reference keeps."""
    assert got.dtype == torch.bool and got.shape == w.shape
    assert is_transposable(got, n, m)
    np.testing.assert_allclose(tile_sums(w, got, m).numpy(), tile_sums(w, ref, m).numpy(), rtol=rtol, atol=0)


@pytest.mark.parametrize("n,m", NM)
def test_random_tiles_match_the_pytorch_solver(n, m):
    w = torch.randn(3 * m, 5 * m, generator=torch.Generator().manual_seed(n * 100 + m))
    got, ref = kt.transposable_exact_native(w, n, m), torch_mask(w, n, m)
    assert_optimal_like(w, got, ref, n, m)
    assert torch.equal(got, ref)  # without ties the optimum is unique: the very same mask


def ortools_tile_optimum(tile: np.ndarray, n: int, scale: float) -> float:
    """Max kept sum of one tile by OR-tools' min-cost flow on integer costs round(|w| * scale)."""
    from ortools.graph.python import min_cost_flow

    m = tile.shape[0]
    f = min_cost_flow.SimpleMinCostFlow()
    src, snk = 2 * m, 2 * m + 1
    for i in range(m):
        f.add_arc_with_capacity_and_unit_cost(src, i, n, 0)
        f.add_arc_with_capacity_and_unit_cost(m + i, snk, n, 0)
        for j in range(m):
            f.add_arc_with_capacity_and_unit_cost(i, m + j, 1, -int(round(abs(tile[i, j]) * scale)))
    f.set_node_supply(src, n * m)
    f.set_node_supply(snk, -n * m)
    assert f.solve() == f.OPTIMAL
    return -f.optimal_cost() / scale


@pytest.mark.parametrize("n,m", [(4, 8), (2, 8), (8, 16), (5, 16), (16, 32), (9, 32), (20, 64), (1, 4), (2, 4)])
def test_against_ortools_min_cost_flow(n, m):
    pytest.importorskip("ortools.graph.python.min_cost_flow")
    g = torch.Generator().manual_seed(7 * m + n)
    # integer magnitudes: OR-tools' integer costs are exact, and ties abound
    wi = torch.randint(-20, 21, (m, 2 * m), generator=g).float()
    got = tile_sums(wi, kt.transposable_exact_native(wi, n, m), m).numpy()
    ref = [ortools_tile_optimum(t, n, 1.0) for t in to_tiles(wi, m).numpy()]
    np.testing.assert_array_equal(got, ref)
    # Gaussian floats: OR-tools on |w| x 1e9 rounded, so equal to rounding
    wf = torch.randn(m, 2 * m, generator=g)
    got = tile_sums(wf, kt.transposable_exact_native(wf, n, m), m).numpy()
    ref = [ortools_tile_optimum(t, n, 1e9) for t in to_tiles(wf.double(), m).numpy()]
    np.testing.assert_allclose(got, ref, rtol=0, atol=n * m * 1e-9)


def test_against_the_lp():
    from scipy.optimize import linprog

    n, m = 3, 8
    w = torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = tile_sums(w, kt.transposable_exact_native(w, n, m), m).numpy()
    for tile, kept in zip(to_tiles(w.abs(), m).numpy(), got):
        a_eq = [np.eye(m)[i].repeat(m) for i in range(m)] + [np.tile(np.eye(m)[j], m) for j in range(m)]
        res = linprog(-tile.ravel(), A_eq=np.array(a_eq), b_eq=np.full(2 * m, n), bounds=(0, 1), method="highs")
        assert res.status == 0 and kept == pytest.approx(-res.fun, rel=1e-12)


TIED = {
    "all equal": lambda g, shape: torch.full(shape, 0.5),
    "zeros": lambda g, shape: torch.zeros(shape),
    "few levels": lambda g, shape: torch.randint(0, 3, shape, generator=g).float(),
    "sparse": lambda g, shape: torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.2),
    "signed ties": lambda g, shape: torch.randint(-2, 3, shape, generator=g).float(),
    "rows equal": lambda g, shape: torch.randn(1, shape[1], generator=g).expand(shape).contiguous(),
}


@pytest.mark.parametrize("kind", sorted(TIED))
@pytest.mark.parametrize("n,m", [(4, 8), (8, 16), (3, 16), (16, 32)])
def test_ties_zeros_and_determinism(kind, n, m):
    w = TIED[kind](torch.Generator().manual_seed(m + n), (2 * m, 4 * m))
    got = kt.transposable_exact_native(w, n, m)
    if m <= 16:
        assert_optimal_like(w, got, torch_mask(w, n, m), n, m)
    else:
        pytest.importorskip("ortools.graph.python.min_cost_flow")
        assert is_transposable(got, n, m)
        ref = [ortools_tile_optimum(t, n, 1e9) for t in to_tiles(w.double(), m).numpy()]
        np.testing.assert_allclose(tile_sums(w, got, m).numpy(), ref, rtol=0, atol=n * m * 1e-9)
    assert torch.equal(got, kt.transposable_exact_native(w.clone(), n, m))  # deterministic


@pytest.mark.parametrize("n,m", [(4, 8), (8, 16)])
def test_nonfinite_entries_rank_first(n, m):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2 * m, 2 * m, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.15] = float("nan")
    w[0, :3] = float("inf")
    w[1, 1] = -float("inf")
    got, ref = kt.transposable_exact_native(w, n, m), torch_mask(w, n, m)
    assert is_transposable(got, n, m)
    bad = ~torch.isfinite(w)
    np.testing.assert_array_equal(tile_sums(bad.float(), got, m), tile_sums(bad.float(), ref, m))
    finite = torch.where(bad, 0.0, w)
    np.testing.assert_allclose(tile_sums(finite, got, m), tile_sums(finite, ref, m), rtol=1e-12)


@pytest.mark.slow
@given(st.data())
def test_hypothesis_tiles(data):
    m = data.draw(st.sampled_from([4, 5, 8, 16]), label="m")
    n = data.draw(st.integers(0, m), label="n")
    tiles = data.draw(st.integers(1, 3), label="tiles")
    ints = data.draw(st.booleans(), label="integer-valued")
    elem = (st.integers(-4, 4).map(float) if ints
            else st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32))
    vals = data.draw(st.lists(elem, min_size=tiles * m * m, max_size=tiles * m * m), label="values")
    w = torch.tensor(vals, dtype=torch.float32).reshape(tiles * m, m)  # a batch of tiles, stacked
    got = kt.transposable_exact_native(w, n, m)
    assert_optimal_like(w, got, torch_mask(w, n, m), n, m, rtol=1e-9)


def test_batch_of_tiles_is_the_stacked_matrix():
    w = torch.randn(10, 8, 8, generator=torch.Generator().manual_seed(0))
    got = kt.transposable_exact_native(w.reshape(-1, 8), 4, 8).reshape(10, 8, 8)
    for k in range(10):
        assert torch.equal(got[k], kt.transposable_exact_native(w[k], 4, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dispatch_runs_native_for_every_float_dtype(dtype):
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert kt.uses_native(w, 4, 8)
    got = nmsparse.transposable_mask(w, 4, 8)
    assert_optimal_like(w, got, torch_mask(w, 4, 8), 4, 8)


def test_dispatch_keeps_the_pytorch_path_elsewhere():
    w = torch.randn(16, 16)
    assert nmsparse.transposable_mask is kt.transposable_mask
    assert kt.uses_native(w, 2, 4) and not kt.uses_native(w, 1, 2)  # m = 2: enumeration
    assert kt.uses_native(w, 4, 8, "greedy") and kt.uses_native(w, 2, 4, "greedy")  # greedy: compiled for any m
    assert not kt.uses_native(torch.randn(128, 128), 64, 128)  # beyond the C++ solver's 64
    assert torch.equal(kt.transposable_mask(w, 4, 8, "greedy"), torch_mask(w, 4, 8, "greedy"))
    # m = 4 goes to the compiled solver: on tied weights (integers in -2..2) it keeps what the enumeration keeps
    tied = torch.randint(-2, 3, (32, 48), generator=torch.Generator().manual_seed(3)).float()
    assert_optimal_like(tied, kt.transposable_mask(tied, 2, 4), torch_mask(tied, 2, 4), 2, 4)
    with pytest.raises(ValueError, match="method"):
        kt.transposable_mask(w, 4, 8, "optimal")
    with pytest.raises(ValueError, match="m <= 64"):
        kt.transposable_exact_native(torch.randn(128, 128), 4, 128)
    with pytest.raises(ValueError, match="divisible|multiple"):
        kt.transposable_mask(torch.randn(12, 16), 4, 8)
    with pytest.raises(TypeError):
        kt.transposable_mask(torch.ones(8, 8, dtype=torch.int32), 4, 8)


@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (3, 4), (4, 8), (2, 8), (8, 16), (5, 16), (16, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_greedy_is_the_pytorch_greedy_mask(n, m, dtype):
    """Same mask entry for entry: same order (|w| descending, NaN and inf first, ties by position)."""
    gen = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randn(3 * m, 5 * m, generator=gen).to(dtype)
    w.view(-1)[::5] = 0.5  # ties across rows and columns
    w.view(-1)[::11] = 0.0
    if dtype != torch.float16:
        w[0, 0], w[1, 2], w[m - 1, m - 1] = float("nan"), float("inf"), -float("inf")
    got = kt.transposable_mask(w, n, m, "greedy")
    assert torch.equal(got, torch_mask(w, n, m, "greedy"))
    assert is_transposable(got, n, m, exact=False)


def test_conv_weight_through_its_2d_view():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    mask = nmsparse.transposable_mask(conv_to_2d(w), 4, 8)
    assert is_transposable(mask, 4, 8)
    assert torch.equal(mask, torch_mask(conv_to_2d(w), 4, 8))


def test_edge_sizes():
    assert kt.transposable_exact_native(torch.randn(0, 16), 4, 8).shape == (0, 16)
    assert kt.transposable_exact_native(torch.randn(8, 8), 0, 8).sum() == 0
    assert kt.transposable_exact_native(torch.randn(8, 8), 8, 8).all()
    w = torch.randn(64, 64)[:, ::2][:32]  # not contiguous
    assert is_transposable(kt.transposable_exact_native(w, 4, 8), 4, 8)


@pytest.mark.parametrize("n,m", [(4, 8), (8, 16), (16, 32)])
def test_same_mask_for_one_and_two_threads(n, m):
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(m))
    w[:64] = torch.randint(0, 3, (64, 512), generator=torch.Generator().manual_seed(1)).float()  # ties too
    old = torch.get_num_threads()
    try:
        masks = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            masks.append(kt.transposable_exact_native(w, n, m))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


@pytest.mark.slow
def test_no_native_falls_back_to_pytorch():
    """NMSPARSE_NO_NATIVE=1: no build, the PyTorch solver, the same optimum (a fresh interpreter)."""
    code = (
        "import torch\n"
        "from nmsparse.kernels import transposable as kt\n"
        "from nmsparse.patterns import transposable_mask as pm\n"
        "w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))\n"
        "assert not kt.uses_native(w, 4, 8) and not kt.native_available()\n"
        "assert 'NMSPARSE_NO_NATIVE' in kt.native_error()\n"
        "assert torch.equal(kt.transposable_mask(w, 4, 8), pm(w, 4, 8))\n"
        "try:\n"
        "    kt.transposable_exact_native(w, 4, 8)\n"
        "    raise SystemExit('no error')\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e)\n"
        "torch.save(kt.transposable_mask(w, 4, 8), __import__('sys').argv[1])\n"
    )
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nmsparse-fallback-{os.getpid()}.pt")
    src = str(Path(nmsparse.__file__).resolve().parents[1])
    env = dict(os.environ, NMSPARSE_NO_NATIVE="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code, out], env=env, check=True, timeout=120)
    try:
        w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
        assert torch.equal(torch.load(out), kt.transposable_exact_native(w, 4, 8))
    finally:
        os.remove(out)
